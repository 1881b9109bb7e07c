//! `delta export peft REF -o DIR`.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::Ctx;
use crate::delta::{self, Format};
use crate::hub;

/// Export formats.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// A folder Hugging Face PEFT loads: adapter_config.json + adapter_model.safetensors.
    /// A delta with a classification head becomes a SEQ_CLS adapter for
    /// `BertForSequenceClassification` (AutoPeftModelForSequenceClassification loads it).
    Peft {
        /// The delta (LoRA or IA3): a registry reference or a native delta folder.
        reference: String,
        /// Output folder (absent or empty).
        #[arg(short, long)]
        output: PathBuf,
        /// What `base_model_name_or_path` names (a Hub id or a local folder), from which
        /// PEFT's Auto classes load the base. Default: the base's registry name.
        #[arg(long)]
        base_model: Option<String>,
    },
}

/// Exports.
pub async fn run(cmd: Command, ctx: &Ctx) -> anyhow::Result<()> {
    let Command::Peft {
        reference,
        output,
        base_model,
    } = cmd;
    let local = std::path::Path::new(&reference);
    let (label, digest) = if local.is_dir() {
        let (manifest, paths) = delta::read_native(local)?;
        delta::check_output_dir(&output, false)?;
        delta::replace_dir(&output, false, |dir| {
            delta::write_peft(dir, &manifest, &paths)
        })
        .with_context(|| format!("cannot export {reference} as a PEFT folder"))?;
        (local.display().to_string(), manifest.digest())
    } else {
        let remote = ctx.remote().await?;
        let progress = ctx.progress("pull");
        let r = hub::pull(
            &remote,
            &ctx.cache,
            &reference,
            &output,
            Format::Peft,
            &progress,
        )
        .await
        .with_context(|| format!("cannot export {reference} as a PEFT folder"))?;
        (format!("{}:v{}", r.repository, r.version), r.digest)
    };
    if let Some(name) = &base_model {
        set_base_model(&output, name)?;
    }
    if ctx.json {
        return ctx
            .print_json(&json!({"delta": label, "digest": digest.to_string(), "output": output}));
    }
    println!("{label} -> {} (PEFT)", output.display());
    Ok(())
}

/// Rewrites `base_model_name_or_path` in an exported adapter_config.json.
fn set_base_model(dir: &std::path::Path, name: &str) -> anyhow::Result<()> {
    let path = dir.join(delta::PEFT_CONFIG);
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("reading {}", path.display()))?;
    config["base_model_name_or_path"] = json!(name);
    delta::write_atomic(&path, &serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}
