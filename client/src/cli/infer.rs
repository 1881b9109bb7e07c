//! `delta predict` and `delta embed`: run inputs through deltas on an inference service
//! (`delta-worker infer`), which resolves the references with your registry token.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use super::Ctx;
use crate::jobs::{Example, parse_jsonl};
use crate::service::{Service, Target};

/// Where the service is and what to run.
#[derive(clap::Args, Debug)]
pub struct Common {
    /// Delta references, mounted in order (`ns/name:tag`, `ns/name@blake3:…`); several
    /// compose. None: the bare base.
    pub deltas: Vec<String>,
    /// Input JSONL: `{"text": …, "text_pair": …?}` per line (`-`: standard input).
    #[arg(long)]
    pub input: PathBuf,
    /// The inference service (`delta-worker infer`).
    #[arg(long, env = "DELTA_SERVICE", default_value = "http://127.0.0.1:50061")]
    pub service: String,
    /// The base, by fingerprint or the service's name for it (default: the deltas' base,
    /// or the service's only one).
    #[arg(long)]
    pub base: Option<String>,
    /// Inputs sent per call (the service's limit is 256 by default).
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
}

/// `delta predict`.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    #[command(flatten)]
    common: Common,
}

/// `delta embed`.
#[derive(clap::Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    common: Common,
    /// Scale each embedding to unit length.
    #[arg(long)]
    normalize: bool,
}

async fn open(c: &Common, ctx: &Ctx) -> anyhow::Result<(Service, Target, Vec<Example>)> {
    let bytes = if c.input.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b).context("reading stdin")?;
        b
    } else {
        std::fs::read(&c.input).with_context(|| format!("reading {}", c.input.display()))?
    };
    let examples = parse_jsonl(&bytes, &c.input.display().to_string())?;
    if examples.is_empty() {
        anyhow::bail!("{} holds no inputs", c.input.display());
    }
    let service = Service::connect(&c.service, ctx.token.as_deref(), ctx.ca_cert.as_deref())
        .await
        .with_context(|| format!("connecting to the inference service at {}", c.service))?;
    let target = Target {
        deltas: c.deltas.clone(),
        base: c.base.clone().unwrap_or_default(),
    };
    Ok((service, target, examples))
}

/// Prints one line per input: label, probability and text (JSON lines with `--json`).
pub async fn predict(args: PredictArgs, ctx: &Ctx) -> anyhow::Result<()> {
    predict_to(args, ctx, &mut std::io::stdout().lock()).await
}

/// [`predict`], writing to `out`.
pub async fn predict_to(args: PredictArgs, ctx: &Ctx, out: &mut impl Write) -> anyhow::Result<()> {
    let (service, target, examples) = open(&args.common, ctx).await?;
    for chunk in examples.chunks(args.common.chunk.max(1)) {
        let r = service.predict(&target, chunk).await?;
        for (p, e) in r.predictions.iter().zip(chunk) {
            let line = if ctx.json {
                let mut v = serde_json::to_value(p)?;
                v["text"] = serde_json::json!(e.text);
                if let Some(pair) = &e.text_pair {
                    v["text_pair"] = serde_json::json!(pair);
                }
                v["deltas"] = serde_json::to_value(&r.deltas)?;
                v.to_string()
            } else {
                let name = p.label.clone().unwrap_or_else(|| p.label_index.to_string());
                let prob = p.probabilities.get(p.label_index).copied().unwrap_or(0.0);
                format!("{name}\t{prob:.4}\t{}", e.text)
            };
            if writeln!(out, "{line}").is_err() {
                // A closed pipe (`| head`) ends the output, not with a panic.
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Prints one embedding per line: its values separated by spaces (JSON lines with
/// `--json`).
pub async fn embed(args: EmbedArgs, ctx: &Ctx) -> anyhow::Result<()> {
    embed_to(args, ctx, &mut std::io::stdout().lock()).await
}

/// [`embed`], writing to `out`.
pub async fn embed_to(args: EmbedArgs, ctx: &Ctx, out: &mut impl Write) -> anyhow::Result<()> {
    let (service, target, examples) = open(&args.common, ctx).await?;
    for chunk in examples.chunks(args.common.chunk.max(1)) {
        let r = service.embed(&target, chunk, args.normalize).await?;
        for (v, e) in r.embeddings.iter().zip(chunk) {
            let line = if ctx.json {
                serde_json::json!({"text": e.text, "embedding": v, "deltas": r.deltas}).to_string()
            } else {
                v.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            if writeln!(out, "{line}").is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}
