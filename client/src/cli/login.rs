//! `delta login` / `delta logout`: tokens saved per registry URL in a credentials file that
//! only its owner can read (mode 0600), like cargo's and docker's.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::Context;

use super::Ctx;

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The token (default: read one line from stdin, so it stays out of shell history).
    #[arg(long)]
    pub token: Option<String>,
}

fn read(path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a credentials file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write(path: &Path, creds: &BTreeMap<String, String>) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(&serde_json::to_vec_pretty(creds)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The token saved for `registry`, if any.
pub fn saved_token(path: &Path, registry: &str) -> anyhow::Result<Option<String>> {
    Ok(read(path)?.remove(registry))
}

/// Saves a token.
pub fn login(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let token = match args.token {
        Some(t) => t,
        None => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            line
        }
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        anyhow::bail!("no token given");
    }
    let mut creds = read(&ctx.credentials)?;
    creds.insert(ctx.registry.clone(), token);
    write(&ctx.credentials, &creds)?;
    println!(
        "token saved for {} in {}",
        ctx.registry,
        ctx.credentials.display()
    );
    Ok(())
}

/// Forgets a token.
pub fn logout(ctx: &Ctx) -> anyhow::Result<()> {
    let mut creds = read(&ctx.credentials)?;
    let had = creds.remove(&ctx.registry).is_some();
    write(&ctx.credentials, &creds)?;
    println!(
        "{} for {}",
        if had {
            "token removed"
        } else {
            "no token saved"
        },
        ctx.registry
    );
    Ok(())
}
