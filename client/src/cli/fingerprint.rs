//! `delta fingerprint PATH`.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::Ctx;
use crate::tensors::Model;

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A safetensors file, or a folder with model.safetensors or model.safetensors.index.json.
    pub path: PathBuf,
}

/// Prints the fingerprint.
pub async fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let path = args.path.clone();
    let (fp, n) = tokio::task::spawn_blocking(move || {
        let model = Model::open(&path)?;
        Ok::<_, crate::Error>((model.fingerprint(), model.table().len()))
    })
    .await?
    .with_context(|| format!("cannot fingerprint {}", args.path.display()))?;
    if ctx.json {
        ctx.print_json(&json!({"path": args.path, "fingerprint": fp.to_string(), "tensors": n}))
    } else {
        println!("{fp}");
        Ok(())
    }
}
