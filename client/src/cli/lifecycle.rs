//! `delta yank`, `delta delete`, `delta untag`, `delta gc`: lifecycle commands.

use anyhow::Context;
use serde_json::json;

use super::{Ctx, human_bytes};

/// `delta yank REF [--undo]`.
#[derive(clap::Args, Debug)]
pub struct YankArgs {
    /// The version to yank.
    pub reference: String,
    /// Restore a yanked version.
    #[arg(long)]
    pub undo: bool,
}

/// `delta untag REPO:TAG`.
#[derive(clap::Args, Debug)]
pub struct UntagArgs {
    /// `namespace/name:tag`.
    pub target: String,
}

/// `delta gc [--dry-run]`.
#[derive(clap::Args, Debug)]
pub struct GcArgs {
    /// List what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep blobs referenced or uploaded within this period (`30s`, `2h`, or seconds; the
    /// default is the registry's own, 1h unless its operator changed it), as
    /// `delta-registry gc --grace` does.
    #[arg(long = "grace", alias = "grace-seconds", value_parser = parse_grace)]
    pub grace: Option<u64>,
}

/// `--grace`: a duration (`90s`, `2h`) or plain seconds.
fn parse_grace(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| format!("{s:?} is not a duration such as 90s or 2h: {e}"))
}

/// Yanks or restores.
pub async fn yank(args: YankArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let (repo, v, tags) = ctx
        .remote()
        .await?
        .yank(&args.reference, args.undo)
        .await
        .with_context(|| format!("cannot yank {}", args.reference))?;
    let what = if args.undo { "restored" } else { "yanked" };
    if ctx.json {
        return ctx.print_json(
            &json!({"repository": repo, "version": v, "yanked": !args.undo, "tags": tags}),
        );
    }
    println!("{repo}:v{v} {what}");
    if !args.undo && !tags.is_empty() {
        // Yanking moves no tag but `latest`: whoever pulls these still gets the version.
        eprintln!(
            "warning: still tagged {} (pulls of {} get the yanked version, with a warning; move them with `delta tag {repo}:vN TAG`)",
            tags.join(", "),
            tags.iter()
                .map(|t| format!("{repo}:{t}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Deletes a version.
pub async fn delete(reference: String, ctx: &Ctx) -> anyhow::Result<()> {
    let (repo, v) = ctx
        .remote()
        .await?
        .delete_version(&reference)
        .await
        .with_context(|| format!("cannot delete {reference}"))?;
    if ctx.json {
        return ctx.print_json(&json!({"repository": repo, "version": v, "deleted": true}));
    }
    println!("{repo}:v{v} deleted (its blobs are freed by the next gc)");
    Ok(())
}

/// Removes a tag.
pub async fn untag(args: UntagArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let (repo, tag) = args
        .target
        .split_once(':')
        .with_context(|| format!("{} is not namespace/name:tag", args.target))?;
    let deleted = ctx.remote().await?.delete_tag(repo, tag).await?;
    if ctx.json {
        return ctx.print_json(&json!({"repository": repo, "tag": tag, "deleted": deleted}));
    }
    println!(
        "{}",
        if deleted {
            format!("{repo}:{tag} removed")
        } else {
            format!("{repo} has no tag {tag}")
        }
    );
    Ok(())
}

/// Collects garbage.
pub async fn gc(args: GcArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let (blobs, bytes, digests) = ctx
        .remote()
        .await?
        .collect_garbage(args.dry_run, args.grace.unwrap_or(0))
        .await
        .context("gc failed")?;
    if ctx.json {
        return ctx.print_json(
            &json!({"blobs": blobs, "bytes": bytes, "digests": digests, "dry_run": args.dry_run}),
        );
    }
    for d in &digests {
        println!("{d}");
    }
    let verb = if args.dry_run { "would free" } else { "freed" };
    let grace = match args.grace {
        Some(g) if g > 0 => {
            humantime::format_duration(std::time::Duration::from_secs(g)).to_string()
        }
        _ => "the registry's default".to_owned(),
    };
    println!(
        "{verb} {} in {blobs} blobs (blobs referenced or uploaded within the grace period, {grace}, are kept: --grace)",
        human_bytes(bytes)
    );
    Ok(())
}
