//! `delta cache` and `delta cache clean`: where the local cache is, what it holds, and
//! emptying it (as `pip cache` and `hf cache` do).

use serde_json::json;

use super::{Ctx, human_bytes};

/// Subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Where the cache is and what it holds: blobs, partial downloads, pulled files it
    /// notes instead of keeping a copy.
    Info,
    /// Empty the cache (blobs, partial downloads not in progress, notes). Pulled folders
    /// are left as they are; what is needed again is downloaded again.
    Clean,
}

/// Runs a `delta cache` subcommand.
pub fn run(cmd: Command, ctx: &Ctx) -> anyhow::Result<()> {
    let cache = &ctx.cache;
    match cmd {
        Command::Info => {
            let u = cache.usage();
            if ctx.json {
                return ctx.print_json(&json!({
                    "path": cache.root(),
                    "blobs": u.blobs, "blob_bytes": u.blob_bytes,
                    "partial_downloads": u.partials, "partial_bytes": u.partial_bytes,
                    "noted_files": u.noted,
                }));
            }
            println!("cache: {}", cache.root().display());
            println!("blobs: {} ({})", u.blobs, human_bytes(u.blob_bytes));
            println!(
                "partial downloads: {} ({})",
                u.partials,
                human_bytes(u.partial_bytes)
            );
            println!("pulled files noted (not copied): {}", u.noted);
        }
        Command::Clean => {
            let freed = cache.clean()?;
            if ctx.json {
                return ctx.print_json(&json!({ "path": cache.root(), "freed_bytes": freed }));
            }
            println!(
                "removed {} from {}",
                human_bytes(freed),
                cache.root().display()
            );
        }
    }
    Ok(())
}
