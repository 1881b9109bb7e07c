//! `delta ls [NAMESPACE] [--base NAME] [--method M] [--annotation k=v]`.

use std::collections::BTreeMap;

use anyhow::Context;
use delta_proto::Digest;
use serde_json::json;

use super::{Ctx, human_bytes};

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Every delta (all versions) for this base (name or fingerprint).
    #[arg(long)]
    pub base: Option<String>,
    /// Only this method (lora, ia3, bitfit, ...).
    #[arg(long)]
    pub method: Option<String>,
    /// Only deltas with this annotation (`key=value`, repeatable; all must match, 32 at most).
    #[arg(long = "annotation")]
    pub annotations: Vec<String>,
}

/// Lists.
pub async fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let remote = ctx.remote().await?;
    let ns = args.namespace.clone().unwrap_or_default();
    if args.base.is_none() && args.method.is_none() && args.annotations.is_empty() {
        let repos = remote.list_repositories(&ns).await?;
        if ctx.json {
            let rows: Vec<_> = repos
                .iter()
                .map(|r| json!({"repository": r.repository, "latest_version": r.latest_version, "digest": r.latest_digest,
                                "base": r.base_fingerprint, "method": r.method, "versions": r.versions, "yanked": r.yanked,
                                "updated_at": r.updated_at}))
                .collect();
            return ctx.print_json(&json!(rows));
        }
        if repos.is_empty() {
            // On standard error, as `gh repo list` says it: standard output stays a listing.
            let place = if ns.is_empty() {
                String::new()
            } else {
                format!(" in {ns}")
            };
            eprintln!("no repositories{place} that you can read");
        }
        for r in repos {
            let plural = if r.versions == 1 { "" } else { "s" };
            let versions = if r.yanked {
                format!("all {} version{plural} yanked", r.versions)
            } else {
                format!("{} version{plural}", r.versions)
            };
            println!(
                "{:<40} v{:<4} {:<10} {versions}  base {}  updated {}",
                r.repository,
                r.latest_version,
                r.method,
                short(&r.base_fingerprint),
                super::when(r.updated_at)
            );
        }
        return Ok(());
    }
    let base = match &args.base {
        Some(b) => Some(
            remote
                .get_base(b)
                .await
                .with_context(|| format!("unknown base {b}"))?
                .fingerprint,
        ),
        None => None,
    };
    let mut annotations = BTreeMap::new();
    for a in &args.annotations {
        let (k, v) = a
            .split_once('=')
            .with_context(|| format!("annotation {a:?} is not key=value"))?;
        annotations.insert(k.to_owned(), v.to_owned());
    }
    let deltas = remote
        .search(&ns, base, args.method.as_deref().unwrap_or(""), annotations)
        .await?;
    if ctx.json {
        let rows: Vec<_> = deltas
            .iter()
            .map(|d| json!({"repository": d.repository, "version": d.version, "digest": d.digest, "base": d.base_fingerprint,
                            "method": d.method, "size": d.size, "annotations": d.annotations}))
            .collect();
        return ctx.print_json(&json!(rows));
    }
    if deltas.is_empty() {
        eprintln!("no deltas that you can read match these filters");
    }
    for d in deltas {
        println!(
            "{:<40} v{:<4} {:<10} {:>10}  {}",
            d.repository,
            d.version,
            d.method,
            human_bytes(d.size),
            short(&d.digest)
        );
    }
    Ok(())
}

/// `blake3:` and the first 12 hex digits.
fn short(digest: &Digest) -> String {
    let full = digest.to_string();
    full.get(..19).unwrap_or(&full).to_owned()
}
