//! Training and verification jobs as the CLI and the worker see them: progress events
//! and datasets. The specs `delta train`/`delta verify` submit and `delta-worker` runs
//! are domain types of `delta_proto::jobs` (the registry parses and checks them at
//! `SubmitJob`), re-exported here.

use serde::{Deserialize, Serialize};

pub use delta_proto::jobs::{
    Job, JobEvent, JobKind, JobSpec, JobState, Method, TrainJob, TrainSpec, VerifyJob,
};

/// One progress event of a job (what `--follow` prints).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimiser step.
    pub step: usize,
    /// Total steps.
    pub total_steps: usize,
    /// Training loss (mean over the step's micro-batches).
    #[serde(default)]
    pub loss: Option<f64>,
    /// Evaluation accuracy, when evaluated at this step.
    #[serde(default)]
    pub eval_accuracy: Option<f64>,
    /// Evaluation loss, when evaluated at this step.
    #[serde(default)]
    pub eval_loss: Option<f64>,
    /// Optimiser steps per second so far.
    #[serde(default)]
    pub steps_per_sec: Option<f64>,
    /// Free text (stage changes, warnings).
    #[serde(default)]
    pub message: Option<String>,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(m) = &self.message {
            return write!(f, "{m}");
        }
        write!(f, "step {}/{}", self.step, self.total_steps)?;
        if let Some(l) = self.loss {
            write!(f, "  loss {l:.4}")?;
        }
        if let Some(a) = self.eval_accuracy {
            write!(f, "  eval accuracy {:.2}%", a * 100.0)?;
        }
        if let Some(l) = self.eval_loss {
            write!(f, "  eval loss {l:.4}")?;
        }
        if let Some(s) = self.steps_per_sec {
            write!(f, "  {s:.2} steps/s")?;
        }
        Ok(())
    }
}

/// One example: `{"text": …, "text_pair": …?, "label": …}` (label: string or integer).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// First text.
    pub text: String,
    /// Optional second text (pair classification).
    pub text_pair: Option<String>,
    /// The label, as written (integers as their decimal form).
    pub label: String,
}

/// Parses JSONL; an error names the line and what is wrong with it. A missing label is
/// empty (allowed for prediction; training refuses it). `delta train` checks datasets
/// with it before uploading; the worker parses them with it.
pub fn parse_jsonl(bytes: &[u8], what: &str) -> anyhow::Result<Vec<Example>> {
    use anyhow::{Context, bail};
    let text = std::str::from_utf8(bytes).with_context(|| format!("{what} is not UTF-8"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{what} line {}: not JSON", i + 1))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let text = field("text")
            .with_context(|| format!("{what} line {}: no string field \"text\"", i + 1))?;
        let label = match v.get("label") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            None => String::new(),
            _ => bail!(
                "{what} line {}: \"label\" must be a string or an integer",
                i + 1
            ),
        };
        out.push(Example {
            text,
            text_pair: field("text_pair"),
            label,
        });
    }
    if out.is_empty() {
        bail!("{what} has no examples");
    }
    Ok(out)
}
