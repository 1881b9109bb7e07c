//! `delta login` / `delta logout`: tokens saved per registry URL in a credentials file that
//! only its owner can read (mode 0600), like cargo's and docker's.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::Context;
use delta_proto::tokens::{CallerKind, Scope};

use super::Ctx;

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The token (default: asked for without echo on a terminal, else one line read from
    /// stdin, so it stays out of shell history).
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

/// Checks a token with the registry, then saves it.
pub async fn login(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let token = match args.token {
        Some(t) => t,
        None if std::io::stdin().is_terminal() => {
            rpassword::prompt_password(format!("token for {}: ", ctx.registry))
                .context("cannot read the token")?
        }
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
    // A token the registry does not accept is never saved.
    let opts = crate::remote::ConnectOptions {
        token: Some(token.clone()),
        ca_cert: ctx.ca_cert.clone(),
        lazy: false,
    };
    let who = crate::remote::Remote::connect_opts(&ctx.registry, &opts)
        .await?
        .whoami()
        .await
        .with_context(|| format!("{} does not accept this token; nothing saved", ctx.registry))?;
    let mut creds = read(&ctx.credentials)?;
    creds.insert(ctx.registry.clone(), token);
    write(&ctx.credentials, &creds)?;
    println!(
        "token saved for {} in {}: {}",
        ctx.registry,
        ctx.credentials.display(),
        describe(&who)
    );
    Ok(())
}

/// One line about who a token makes the caller.
pub fn describe(who: &crate::remote::WhoAmI) -> String {
    match who.kind {
        CallerKind::Open => {
            "the registry is open (it has no tokens): everyone may read and write everything".into()
        }
        CallerKind::Anonymous => "no token: anonymous (public namespaces only)".into(),
        kind @ (CallerKind::User | CallerKind::Worker) => {
            let expires = who.expires_at.map_or("never expires".to_owned(), |t| {
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
                format!("expires {}", humantime::format_rfc3339_seconds(at))
            });
            format!(
                "{kind} token {}: {} on {}, {expires}",
                who.token_id,
                who.scope.map_or("no scope", Scope::as_str),
                if who.namespace == "*" {
                    "every namespace (*)"
                } else {
                    &who.namespace
                },
            )
        }
    }
}

/// `delta whoami`: who the registry takes the configured token for.
pub async fn whoami(ctx: &Ctx) -> anyhow::Result<()> {
    let who = ctx.remote().await?.whoami().await?;
    if ctx.json {
        return ctx.print_json(&serde_json::json!({
            "kind": who.kind.as_str(), "token_id": who.token_id, "namespace": who.namespace,
            "scope": who.scope.map_or("", Scope::as_str), "expires_at": who.expires_at,
        }));
    }
    println!("{}", describe(&who));
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
