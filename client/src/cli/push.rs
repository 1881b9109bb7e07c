//! `delta push DIR REPO[:TAG] --base NAME`.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::{Ctx, human_bytes};
use crate::hub;

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A native delta folder (delta.json) or a PEFT LoRA folder (adapter_config.json).
    pub dir: PathBuf,
    /// `namespace/name`, optionally with `:tag`.
    pub target: String,
    /// Registered name of the base model the delta was trained on.
    #[arg(long)]
    pub base: String,
    /// More tags to point at the new version.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Push tensors that hold NaN or ±Inf (refused by default).
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// An annotation `KEY=VALUE` (repeatable): `task=sentiment`, `license=apache-2.0`;
    /// `delta ls --annotation KEY=VALUE` finds it.
    #[arg(long = "annotation", value_parser = parse_annotation)]
    pub annotations: Vec<(String, String)>,
}

/// `--annotation KEY=VALUE`.
fn parse_annotation(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Pushes.
pub async fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    // A local mistake is named first, as `git push` does, registry up or not.
    if !args.dir.is_dir() {
        let what = if args.dir.exists() {
            "not a folder (push takes a native delta folder or a PEFT folder)"
        } else {
            "no such folder"
        };
        anyhow::bail!(
            "cannot push {} to {}: {what}",
            args.dir.display(),
            args.target
        );
    }
    let remote = ctx.remote().await?;
    let progress = ctx.progress("push");
    let opts = hub::PushOptions {
        tags: args.tags.clone(),
        allow_nonfinite: args.allow_nonfinite,
        annotations: args.annotations.iter().cloned().collect(),
    };
    let r = hub::push_with(
        &remote,
        &args.dir,
        &args.target,
        &args.base,
        &opts,
        &progress,
    )
    .await
    .with_context(|| format!("cannot push {} to {}", args.dir.display(), args.target))?;
    if ctx.json {
        return ctx.print_json(&json!({
            "repository": r.repository, "version": r.version, "digest": r.digest.to_string(),
            "created": r.created, "bytes_uploaded": r.bytes_uploaded, "blobs_uploaded": r.blobs_uploaded,
        }));
    }
    let note = if r.created {
        ""
    } else {
        " (unchanged: already the latest version)"
    };
    println!("{}:v{} {}{note}", r.repository, r.version, r.digest);
    eprintln!(
        "uploaded {} in {} blob(s)",
        human_bytes(r.bytes_uploaded),
        r.blobs_uploaded
    );
    Ok(())
}
