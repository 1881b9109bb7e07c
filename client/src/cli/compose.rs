//! `delta compose REF_OR_DIR... -o DIR --mode parallel|sequential [--merge ...]`.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::Ctx;
use crate::compose::{ComposeOptions, Merge, Mode, compose};

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Deltas: folders (native or PEFT, with --base PATH) or registry references.
    #[arg(required = true)]
    pub deltas: Vec<String>,
    /// Output folder (a native delta, pushable).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Parallel or sequential.
    #[arg(long, value_enum, default_value = "parallel")]
    pub mode: Mode,
    /// Merge method.
    #[arg(long, value_enum, default_value = "cat")]
    pub merge: Merge,
    /// One weight per delta, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub weights: Vec<f32>,
    /// Rank of a re-factorised LoRA (default: the sum of the input ranks).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Fraction kept by ties, dare_* and magnitude_prune.
    #[arg(long, default_value_t = 1.0)]
    pub density: f32,
    /// Seed for DARE and the SVD sketch.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Base model file, needed only to read folder deltas whose names must be resolved (PEFT).
    #[arg(long)]
    pub base: Option<PathBuf>,
}

/// Composes.
pub async fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let remote = super::remote_if_needed(ctx, &args.deltas).await?;
    let base = match &args.base {
        Some(p) => {
            let p = p.clone();
            tokio::task::spawn_blocking(move || {
                let m = crate::tensors::Model::open(&p)?;
                Ok::<_, crate::Error>(m.base_record(&p.display().to_string()))
            })
            .await??
        }
        None => match &remote {
            Some(r) => {
                let first = r
                    .resolve(
                        args.deltas
                            .iter()
                            .find(|d| !std::path::Path::new(d).is_dir())
                            .map_or("", String::as_str),
                    )
                    .await?;
                r.get_base(&first.manifest.base.fingerprint.to_string())
                    .await?
            }
            None => anyhow::bail!(
                "composing folders needs --base PATH (to check them against the base's tensor table)"
            ),
        },
    };
    let deltas = super::load_deltas(ctx, remote.as_ref(), &args.deltas, &base).await?;
    let opts = ComposeOptions {
        mode: args.mode,
        merge: args.merge,
        weights: args.weights.clone(),
        rank: args.rank,
        density: args.density,
        seed: args.seed,
    };
    let out = args.output.clone();
    let report = tokio::task::spawn_blocking(move || compose(&deltas, &opts, &out))
        .await?
        .context("cannot compose")?;
    let worst = report
        .truncation_error
        .values()
        .copied()
        .fold(0.0, f64::max);
    if ctx.json {
        return ctx.print_json(&json!({
            "output": args.output, "digest": report.manifest.digest().to_string(), "method": report.manifest.method,
            "truncation_error": report.truncation_error, "max_truncation_error": worst,
        }));
    }
    println!(
        "{} ({}, {})",
        args.output.display(),
        report.manifest.method,
        report.manifest.digest()
    );
    for (m, e) in &report.truncation_error {
        eprintln!("  {m}: relative truncation error {e:.2e}");
    }
    Ok(())
}
