//! `delta base add NAME PATH`, `delta base ls`.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::Ctx;
use crate::tensors::Model;

/// Base subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Register a base: its name, fingerprint and tensor table (the weights stay local).
    Add {
        /// Name to register it under.
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
            let (fp, table) = tokio::task::spawn_blocking(move || {
                let model = Model::open(&p)?;
                Ok::<_, crate::Error>((model.fingerprint(), model.table()))
            })
            .await?
            .with_context(|| format!("cannot read base {}", path.display()))?;
            let n = table.len();
            let created = ctx
                .remote()
                .await?
                .add_base(&name, fp, table)
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
