//! `delta pull REF [-o DIR] [--format native|peft]`.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::{Ctx, human_bytes};
use crate::delta::Format;
use crate::hub;

/// Output format.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    /// delta.json + safetensors.
    Native,
    /// PEFT adapter_config.json + adapter_model.safetensors.
    Peft,
}

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// `ns/name`, `ns/name:tag`, `ns/name:v3` or `ns/name@blake3:...`.
    pub reference: String,
    /// Output folder (default: the repository's name).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Folder format.
    #[arg(long, value_enum, default_value = "native")]
    pub format: FormatArg,
    /// Replace a non-empty output folder: afterwards it holds exactly the pulled delta.
    #[arg(long)]
    pub overwrite: bool,
    /// Neither read the local cache nor leave anything in it (no note of the pulled
    /// files, no partial download to resume), as pip's `--no-cache-dir`. Every byte is
    /// still verified.
    #[arg(long)]
    pub no_cache: bool,
}

/// Pulls.
pub async fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let reference: delta_proto::Reference = args.reference.parse()?;
    let out = args
        .output
        .unwrap_or_else(|| PathBuf::from(reference.repository.name()));
    let format = match args.format {
        FormatArg::Native => Format::Native,
        FormatArg::Peft => Format::Peft,
    };
    let remote = ctx.remote().await?;
    let progress = ctx.progress("pull");
    let opts = hub::PullOptions {
        format,
        overwrite: args.overwrite,
        no_cache: args.no_cache,
    };
    let r = hub::pull_with(&remote, &ctx.cache, &args.reference, &out, opts, &progress)
        .await
        .with_context(|| format!("cannot pull {}", args.reference))?;
    if r.yanked {
        eprintln!(
            "{}",
            super::yanked_warning(&args.reference, &r.repository, r.version)
        );
    }
    if ctx.json {
        return ctx.print_json(&json!({
            "repository": r.repository, "version": r.version, "digest": r.digest.to_string(),
            "bytes_downloaded": r.bytes_downloaded, "output": out, "yanked": r.yanked,
        }));
    }
    println!(
        "{}:v{} {} -> {}",
        r.repository,
        r.version,
        r.digest,
        out.display()
    );
    eprintln!(
        "downloaded {} ({} total)",
        human_bytes(r.bytes_downloaded),
        human_bytes(r.manifest.size())
    );
    Ok(())
}
