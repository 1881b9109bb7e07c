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
    /// Keep blobs referenced within this many seconds (default: the registry's).
    #[arg(long, default_value_t = 0)]
    pub grace_seconds: u64,
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
        .collect_garbage(args.dry_run, args.grace_seconds)
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
    println!("{verb} {} in {blobs} blobs", human_bytes(bytes));
    Ok(())
}
