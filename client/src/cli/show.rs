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
    let reports = remote.list_reports(&args.reference).await?;
    let reports: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            let body: serde_json::Value = serde_json::from_str(&r.body).unwrap_or(json!(null));
            json!({"at": r.at, "job": r.job, "report": body})
        })
        .collect();
    let m = &r.manifest;
    if r.yanked {
        eprintln!(
            "{}",
            super::yanked_warning(&args.reference, &r.repository, r.version)
        );
    }
    if ctx.json {
        let manifest: serde_json::Value = serde_json::from_slice(&m.canonical_json())?;
        let versions: Vec<_> = versions.iter().map(|v| json!({"version": v.version, "digest": v.digest, "tags": v.tags, "size": v.size, "created_at": v.created_at, "pushed_by": v.pushed_by.as_deref().unwrap_or("")})).collect();
        return ctx.print_json(&json!({
            "repository": r.repository, "version": r.version, "digest": r.digest.to_string(), "tags": r.tags,
            "yanked": r.yanked,
            "size": m.size(), "manifest": manifest, "versions": versions, "reports": reports,
        }));
    }
    println!(
        "{}:v{}  {}{}",
        r.repository,
        r.version,
        r.digest,
        if r.yanked { "  (YANKED)" } else { "" }
    );
    println!("tags:     {}", r.tags.join(", "));
    if let Some(v) = versions.iter().find(|v| v.version == r.version) {
        let by = match (v.pushed_by.as_deref(), m.provenance.get("job")) {
            (None, Some(job)) => format!(
                " by job {job} on worker {}",
                m.provenance
                    .get("worker")
                    .and_then(|w| w.as_str())
                    .unwrap_or("?")
            ),
            (None, None) => String::new(),
            (Some(who), _) => format!(" by {who}"),
        };
        println!("pushed:   {}{by}", super::when(v.created_at));
    }
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
    if let Some(metrics) = m.provenance.get("metrics") {
        println!("metrics:  {metrics}");
    }
    for r in &reports {
        let rep = &r["report"];
        println!(
            "report:   job {} {} on {} ({}): {} metrics {} matches recorded: {}",
            r["job"],
            if rep["passed"] == json!(true) {
                "passed"
            } else {
                "FAILED"
            },
            rep["worker"].as_str().unwrap_or("?"),
            rep["device"].as_str().unwrap_or("?"),
            rep["checks"]
                .as_array()
                .map(|c| c.len())
                .unwrap_or(0)
                .to_string()
                + " checks,",
            rep["metrics"],
            rep["matches_recorded"]
        );
    }
    println!("versions:");
    for v in versions {
        println!(
            "  v{:<4} {} {:>10} {} {}",
            v.version,
            v.digest,
            human_bytes(v.size),
            super::when(v.created_at),
            v.tags.join(",")
        );
    }
    Ok(())
}
