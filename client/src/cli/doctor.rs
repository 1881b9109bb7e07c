//! `delta doctor`: checks what a working setup needs, one line each, and exits 1 if any
//! check fails: the registry answers, the token (if any) is accepted, the cache is
//! writable and its blobs hash to their names, and local bases are registered under their
//! fingerprints.

use std::path::PathBuf;

use serde_json::json;

use super::Ctx;
use crate::hub;
use crate::tensors::Model;

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Local base models to look up on the registry by fingerprint.
    #[arg(long = "base")]
    pub bases: Vec<PathBuf>,
    /// Re-hash every cached blob (default: at most 16).
    #[arg(long)]
    pub deep: bool,
}

struct Report {
    checks: Vec<(String, bool, String)>,
}

impl Report {
    fn add(&mut self, what: &str, ok: bool, detail: String) {
        self.checks.push((what.to_owned(), ok, detail));
    }
}

/// Runs the checks.
pub async fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let mut r = Report { checks: Vec::new() };
    // WhoAmI answers any caller: a refused token still shows the registry is there.
    let remote = match ctx.remote().await {
        Ok(remote) => match remote.whoami().await {
            Ok(who) => {
                r.add("registry", true, format!("{} answers", ctx.registry));
                r.add("auth", true, super::login::describe(&who));
                Some(remote)
            }
            Err(e @ crate::Error::Rejected { .. }) => {
                r.add("registry", true, format!("{} answers", ctx.registry));
                r.add(
                    "auth",
                    false,
                    format!("the registry refuses the token: {e}"),
                );
                None
            }
            Err(e) => {
                r.add("registry", false, format!("{}: {e}", ctx.registry));
                r.add(
                    "auth",
                    false,
                    "not checked: the registry did not answer".into(),
                );
                None
            }
        },
        Err(e) => {
            r.add("registry", false, format!("{}: {e:#}", ctx.registry));
            r.add(
                "auth",
                false,
                "not checked: the registry did not answer".into(),
            );
            None
        }
    };
    let cache = &ctx.cache;
    let probe = cache.root().join(".doctor-probe");
    let writable = std::fs::create_dir_all(cache.root())
        .and_then(|()| std::fs::write(&probe, b"ok"))
        .and_then(|()| std::fs::remove_file(&probe));
    match writable {
        Ok(()) => r.add(
            "cache",
            true,
            format!("{} is writable", cache.root().display()),
        ),
        Err(e) => r.add("cache", false, format!("{}: {e}", cache.root().display())),
    }
    let blobs = cache.blobs();
    let n = if args.deep {
        blobs.len()
    } else {
        blobs.len().min(16)
    };
    let bad: Vec<String> = blobs[..n]
        .iter()
        .filter_map(|d| hub::verify_cached(cache, d).err().map(|e| e.to_string()))
        .collect();
    r.add(
        "cache blobs",
        bad.is_empty(),
        if bad.is_empty() {
            format!("{n} of {} cached blobs re-hashed, all intact", blobs.len())
        } else {
            format!(
                "{} corrupt (delete them; they are fetched again): {}",
                bad.len(),
                bad.join("; ")
            )
        },
    );
    for path in &args.bases {
        let fp = match Model::open(path) {
            Ok(m) => m.fingerprint(),
            Err(e) => {
                r.add("base", false, format!("{}: {e}", path.display()));
                continue;
            }
        };
        match &remote {
            None => r.add(
                "base",
                false,
                format!("{}: {fp} (registry unreachable)", path.display()),
            ),
            Some(remote) => match remote.get_base(&fp.to_string()).await {
                Ok(b) => r.add(
                    "base",
                    true,
                    format!("{}: registered as {} ({fp})", path.display(), b.name),
                ),
                Err(_) => r.add(
                    "base",
                    false,
                    format!(
                        "{}: fingerprint {fp} is not registered (delta base add NAME {})",
                        path.display(),
                        path.display()
                    ),
                ),
            },
        }
    }
    let failed = r.checks.iter().filter(|c| !c.1).count();
    if ctx.json {
        let checks: Vec<_> = r
            .checks
            .iter()
            .map(|(w, ok, d)| json!({"check": w, "ok": ok, "detail": d}))
            .collect();
        ctx.print_json(&json!({"ok": failed == 0, "checks": checks}))?;
    } else {
        for (what, ok, detail) in &r.checks {
            println!("{} {what:<12} {detail}", if *ok { "ok  " } else { "FAIL" });
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}
