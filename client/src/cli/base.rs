//! `delta base add NAME PATH`, `delta base ls`.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::Ctx;
use crate::tensors::Model;

/// Base subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Register a base: its name, fingerprint and tensor table with every tensor's
    /// blake3 (the weights stay local; the registry checks the table against the
    /// fingerprint).
    Add {
        /// Name to register it under: `namespace/name` (needs write on the namespace), or
        /// a global name such as `minilm` (needs an admin token for `*`, or an open
        /// registry).
        name: String,
        /// A safetensors file or a folder of shards.
        path: PathBuf,
    },
    /// List registered bases.
    Ls,
}

/// Runs a base subcommand.
pub async fn run(cmd: Command, ctx: &Ctx) -> anyhow::Result<()> {
    match cmd {
        Command::Add { name, path } => {
            let p = path.clone();
            let entries = tokio::task::spawn_blocking(move || {
                Ok::<_, crate::Error>(Model::open(&p)?.entries())
            })
            .await?
            .with_context(|| format!("cannot read base {}", path.display()))?;
            let fp = delta_proto::fingerprint::fingerprint(&mut entries.clone());
            let n = entries.len();
            let created = ctx
                .remote()
                .await?
                .add_base(&name, &entries)
                .await
                .with_context(|| format!("cannot register base {name}"))?;
            if ctx.json {
                ctx.print_json(&json!({"name": name, "fingerprint": fp.to_string(), "tensors": n, "created": created}))
            } else {
                let what = if created {
                    "registered"
                } else {
                    "already registered"
                };
                println!("{name} {what}: {fp} ({n} tensors)");
                Ok(())
            }
        }
        Command::Ls => {
            let bases = ctx.remote().await?.list_bases().await?;
            if ctx.json {
                let rows: Vec<_> = bases
                    .iter()
                    .map(|b| json!({"name": b.name, "fingerprint": b.fingerprint.to_string(), "tensors": b.tensors.len()}))
                    .collect();
                return ctx.print_json(&json!(rows));
            }
            for b in bases {
                println!(
                    "{:<30} {} {:>6} tensors",
                    b.name,
                    b.fingerprint,
                    b.tensors.len()
                );
            }
            Ok(())
        }
    }
}
