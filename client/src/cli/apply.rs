//! `delta apply --base PATH REF_OR_DIR... -o OUT.safetensors [--weights ...] [--sequential]`.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::{Ctx, human_bytes};
use crate::apply::{ApplyOptions, apply};
use crate::hub;
use crate::tensors::Model;

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model: a safetensors file or a folder of shards.
    #[arg(long)]
    pub base: PathBuf,
    /// Deltas: folders (native or PEFT) or registry references, in order.
    #[arg(required = true)]
    pub deltas: Vec<String>,
    /// Output safetensors file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// One weight per delta, comma-separated (default 1 each).
    #[arg(long, value_delimiter = ',')]
    pub weights: Vec<f32>,
    /// Apply each delta to the result of the previous ones (implied when deltas have parents).
    #[arg(long)]
    pub sequential: bool,
    /// Apply even to a base whose fingerprint differs from the deltas' base.
    #[arg(long)]
    pub force: bool,
    /// Accept NaN/Inf values in deltas.
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Refuse instead of pulling parents that are missing from the list.
    #[arg(long)]
    pub no_deps: bool,
}

/// Applies.
pub async fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    if args.output.exists() && !args.overwrite {
        anyhow::bail!(
            "{} exists; pass --overwrite to replace it",
            args.output.display()
        );
    }
    let base_path = args.base.clone();
    let (model, base) = tokio::task::spawn_blocking(move || {
        let model = Model::open(&base_path)?;
        let base = model.base_record(&base_path.display().to_string());
        Ok::<_, crate::Error>((model, base))
    })
    .await?
    .with_context(|| format!("cannot read base {}", args.base.display()))?;
    let fingerprint = base.fingerprint;
    let remote = super::remote_if_needed(ctx, &args.deltas).await?;
    let deltas = super::load_deltas(ctx, remote.as_ref(), &args.deltas, &base).await?;
    let given = deltas.len();
    let deltas = hub::with_parents(
        deltas,
        remote.as_ref(),
        &ctx.cache,
        args.no_deps,
        &ctx.progress("pull"),
    )
    .await?;
    let mut weights = args.weights.clone();
    if !weights.is_empty() && deltas.len() != given {
        // Pulled parents are applied in full.
        let labels: Vec<&str> = args.deltas.iter().map(String::as_str).collect();
        let mut it = weights.into_iter();
        weights = deltas
            .iter()
            .map(|d| {
                if labels.contains(&d.label.as_str()) {
                    it.next().unwrap_or(1.0)
                } else {
                    1.0
                }
            })
            .collect();
    }
    let opts = ApplyOptions {
        weights,
        sequential: args.sequential,
        force: args.force,
        allow_nonfinite: args.allow_nonfinite,
        overwrite: args.overwrite,
    };
    let out = args.output.clone();
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let report =
        tokio::task::spawn_blocking(move || apply(&model, fingerprint, &deltas, &opts, &out))
            .await?
            .with_context(|| format!("cannot apply to {}", args.base.display()))?;
    copy_companions(&args.base, &args.output)?;
    for f in &report.forced {
        eprintln!("warning: {f} was made for a different base; applied anyway because of --force");
    }
    if ctx.json {
        return ctx.print_json(&json!({"output": args.output, "changed": report.changed, "added": report.added, "bytes": report.bytes, "forced": report.forced}));
    }
    println!(
        "{} ({} tensors changed, {} added, {})",
        args.output.display(),
        report.changed,
        report.added,
        human_bytes(report.bytes)
    );
    Ok(())
}

/// Files a model folder carries besides its weights; copied next to the output (when
/// absent there), as `save_pretrained` would, so the applied model runs as it is.
const COMPANIONS: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

fn copy_companions(base: &std::path::Path, output: &std::path::Path) -> anyhow::Result<()> {
    let (true, Some(dir)) = (base.is_dir(), output.parent()) else {
        return Ok(());
    };
    for name in COMPANIONS {
        let (from, to) = (base.join(name), dir.join(name));
        if from.is_file() && !to.exists() {
            std::fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}
