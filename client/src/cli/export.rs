//! `delta export peft REF -o DIR`.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::Ctx;
use crate::delta::Format;
use crate::hub;

/// Export formats.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// A folder Hugging Face PEFT loads: adapter_config.json + adapter_model.safetensors.
    Peft {
        /// The delta (LoRA or IA3).
        reference: String,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// Exports.
pub async fn run(cmd: Command, ctx: &Ctx) -> anyhow::Result<()> {
    let Command::Peft { reference, output } = cmd;
    let remote = ctx.remote().await?;
    let progress = ctx.progress("pull");
    let r = hub::pull(
        &remote,
        &ctx.cache,
        &reference,
        &output,
        Format::Peft,
        &progress,
    )
    .await
    .with_context(|| format!("cannot export {reference} as a PEFT folder"))?;
    if ctx.json {
        return ctx.print_json(&json!({"repository": r.repository, "version": r.version, "digest": r.digest.to_string(), "output": output}));
    }
    println!(
        "{}:v{} -> {} (PEFT)",
        r.repository,
        r.version,
        output.display()
    );
    Ok(())
}
