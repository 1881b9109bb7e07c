//! `delta show REF`.

use anyhow::Context;
use serde_json::json;

use super::{Ctx, human_bytes};

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The delta to show.
    pub reference: String,
}

/// Shows.
pub async fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let remote = ctx.remote().await?;
    let r = remote
        .resolve(&args.reference)
        .await
        .with_context(|| format!("cannot resolve {}", args.reference))?;
    let versions = remote.list_versions(&r.repository).await?;
    let m = &r.manifest;
    if ctx.json {
        let manifest: serde_json::Value = serde_json::from_slice(&m.canonical_json())?;
        let versions: Vec<_> = versions.iter().map(|v| json!({"version": v.version, "digest": v.digest, "tags": v.tags, "size": v.size})).collect();
        return ctx.print_json(&json!({
            "repository": r.repository, "version": r.version, "digest": r.digest.to_string(), "tags": r.tags,
            "size": m.size(), "manifest": manifest, "versions": versions,
        }));
    }
    println!("{}:v{}  {}", r.repository, r.version, r.digest);
    println!("tags:     {}", r.tags.join(", "));
    println!("method:   {}", m.method);
    println!(
        "base:     {} {}",
        m.base.fingerprint,
        m.base.name.as_deref().unwrap_or("")
    );
    println!("size:     {}", human_bytes(m.size()));
    if let Some(l) = &m.config.lora {
        println!(
            "lora:     r={} alpha={} rslora={} targets={}",
            l.r,
            l.lora_alpha,
            l.use_rslora,
            l.target_modules.join(",")
        );
    }
    for p in &m.parents {
        println!(
            "parent:   {} {}",
            p.digest,
            p.reference.as_deref().unwrap_or("")
        );
    }
    for (k, v) in &m.annotations {
        println!("{k}: {v}");
    }
    println!("files:");
    for f in &m.files {
        println!(
            "  {} {} {} ({} tensors)",
            f.path,
            human_bytes(f.size),
            f.digest,
            f.tensors.len()
        );
    }
    println!("versions:");
    for v in versions {
        println!(
            "  v{:<4} {} {:>10} {}",
            v.version,
            v.digest,
            human_bytes(v.size),
            v.tags.join(",")
        );
    }
    Ok(())
}
