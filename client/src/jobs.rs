//! Training and verification jobs: the specs `delta train`/`delta verify` submit and
//! `delta-worker` runs. Specs travel as JSON through the registry's job queue.

use serde::{Deserialize, Serialize};

pub use delta_proto::jobs::{JobKind, JobState};

/// Every method the worker trains.
pub const TRAIN_METHODS: &[&str] = &[
    "lora",
    "adapter",
    "bitfit",
    "prefix",
    "prompt",
    "last-layer",
    "selective",
    "diff",
    "full",
];

/// What to train and how: methods, their settings and the optimiser's hyper-parameters.
/// The same flags serve `delta train` (through the registry) and `delta-worker train`
/// (local).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct TrainSpec {
    /// Methods, comma-separated; several train at once (e.g. `prompt,bitfit,adapter`):
    /// lora, adapter, bitfit, prefix, prompt, last-layer, selective, diff, full.
    #[arg(long = "method", value_delimiter = ',', required = true)]
    pub methods: Vec<String>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    #[serde(default = "d_rank")]
    pub rank: usize,
    /// LoRA alpha (default: 2 × rank).
    #[arg(long)]
    #[serde(default)]
    pub alpha: Option<f64>,
    /// rsLoRA scaling (alpha / sqrt(rank)).
    #[arg(long)]
    #[serde(default)]
    pub rslora: bool,
    /// Modules LoRA (and diff pruning) targets: names or `.`-suffixes such as `query`, or
    /// `re:REGEX` matched against whole module names.
    #[arg(long, value_delimiter = ',', default_value = "query,value")]
    #[serde(default = "d_targets")]
    pub targets: Vec<String>,
    /// Adapter placement: `houlsby` (after attention and feed-forward) or `pfeiffer`
    /// (after feed-forward only).
    #[arg(long, default_value = "houlsby")]
    #[serde(default = "d_adapter")]
    pub adapter_kind: String,
    /// Adapter bottleneck size.
    #[arg(long, default_value_t = 16)]
    #[serde(default = "d_bottleneck")]
    pub bottleneck: usize,
    /// Prefix length (key/value vectors per layer).
    #[arg(long, default_value_t = 8)]
    #[serde(default = "d_len")]
    pub prefix_len: usize,
    /// Train prefixes through an MLP of this hidden size (folded away when saved).
    #[arg(long)]
    #[serde(default)]
    pub prefix_mlp: Option<usize>,
    /// Soft prompt length.
    #[arg(long, default_value_t = 8)]
    #[serde(default = "d_len")]
    pub prompt_len: usize,
    /// Selective tuning: modules to train (names, suffixes or `re:REGEX`).
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub modules: Vec<String>,
    /// Selective tuning: this many modules chosen at random (seeded).
    #[arg(long)]
    #[serde(default)]
    pub random_modules: Option<usize>,
    /// Diff pruning: fraction of difference entries set to zero when saved.
    #[arg(long, default_value_t = 0.99)]
    #[serde(default = "d_sparsity")]
    pub sparsity: f64,
    /// Diff pruning: L1 penalty on the difference during training.
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub l1: f64,
    /// The classification head's input: `cls` (Hugging Face's pooler, dense + tanh over
    /// the first token: what `BertForSequenceClassification` and PEFT's SEQ_CLS run) or
    /// `mean` (the mean of the tokens, sentence-transformers style). Default: `cls` when
    /// the base has pooler weights, else `mean`. Recorded in the delta's head.
    #[arg(long)]
    #[serde(default)]
    pub pooling: Option<String>,
    /// Dropout probability for hidden states, attention and the classifier while
    /// training (default: the base's config, as Hugging Face trains; 0 turns it off).
    #[arg(long)]
    #[serde(default)]
    pub dropout: Option<f64>,
    /// Passes over the training set.
    #[arg(long, default_value_t = 3)]
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Stop after this many optimiser steps.
    #[arg(long)]
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 16)]
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    /// Peak learning rate (default: 1e-4 with full or diff, 3e-2 for prompt/prefix alone,
    /// else 1e-3).
    #[arg(long)]
    #[serde(default)]
    pub lr: Option<f64>,
    /// AdamW weight decay (matrices only).
    #[arg(long, default_value_t = 0.01)]
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Fraction of steps spent warming up (then linear decay to 0).
    #[arg(long, default_value_t = 0.1)]
    #[serde(default = "d_warmup")]
    pub warmup: f64,
    /// Seed for initial values, shuffling and random choices.
    #[arg(long, default_value_t = 42)]
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Evaluate every this many steps (and at the end); the best checkpoint is kept.
    #[arg(long, default_value_t = 50)]
    #[serde(default = "d_eval_every")]
    pub eval_every: usize,
    /// Truncate inputs to this many tokens.
    #[arg(long, default_value_t = 64)]
    #[serde(default = "d_max_len")]
    pub max_len: usize,
}

fn d_rank() -> usize {
    8
}
fn d_targets() -> Vec<String> {
    vec!["query".into(), "value".into()]
}
fn d_adapter() -> String {
    "houlsby".into()
}
fn d_bottleneck() -> usize {
    16
}
fn d_len() -> usize {
    8
}
fn d_sparsity() -> f64 {
    0.99
}
fn d_epochs() -> usize {
    3
}
fn d_batch() -> usize {
    16
}
fn d_one() -> usize {
    1
}
fn d_wd() -> f64 {
    0.01
}
fn d_warmup() -> f64 {
    0.1
}
fn d_seed() -> u64 {
    42
}
fn d_eval_every() -> usize {
    50
}
fn d_max_len() -> usize {
    64
}

impl TrainSpec {
    /// A spec with every default and these methods.
    pub fn new(methods: &[&str]) -> Self {
        Self {
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            rank: d_rank(),
            alpha: None,
            rslora: false,
            targets: d_targets(),
            adapter_kind: d_adapter(),
            bottleneck: d_bottleneck(),
            prefix_len: d_len(),
            prefix_mlp: None,
            prompt_len: d_len(),
            modules: Vec::new(),
            random_modules: None,
            sparsity: d_sparsity(),
            l1: 0.0,
            pooling: None,
            dropout: None,
            epochs: d_epochs(),
            max_steps: None,
            batch_size: d_batch(),
            grad_accum: 1,
            lr: None,
            weight_decay: d_wd(),
            warmup: d_warmup(),
            seed: d_seed(),
            eval_every: d_eval_every(),
            max_len: d_max_len(),
        }
    }

    /// Refuses settings no run could use, naming the flag.
    pub fn check(&self) -> Result<(), String> {
        if self.methods.is_empty() {
            return Err("--method names no method".into());
        }
        for m in &self.methods {
            if !TRAIN_METHODS.contains(&m.as_str()) {
                return Err(format!(
                    "--method {m:?} is not one of {}",
                    TRAIN_METHODS.join(", ")
                ));
            }
        }
        if let Some(p) = &self.pooling
            && p != "cls"
            && p != "mean"
        {
            return Err(format!("--pooling {p:?} is not cls or mean"));
        }
        if let Some(p) = self.dropout
            && !(0.0..1.0).contains(&p)
        {
            return Err(format!("--dropout {p} is not in [0, 1)"));
        }
        let positive = [
            ("--rank", self.rank),
            ("--bottleneck", self.bottleneck),
            ("--prefix-len", self.prefix_len),
            ("--prompt-len", self.prompt_len),
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--eval-every", self.eval_every),
            ("--max-len", self.max_len),
        ];
        for (flag, v) in positive {
            if v == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if !(0.0..1.0).contains(&self.sparsity) {
            return Err("--sparsity must be in [0, 1)".into());
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return Err("--warmup must be in [0, 1)".into());
        }
        if self.lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())) {
            return Err("--lr must be a positive number".into());
        }
        if !matches!(self.adapter_kind.as_str(), "houlsby" | "pfeiffer") {
            return Err("--adapter-kind must be houlsby or pfeiffer".into());
        }
        if self.methods.iter().any(|m| m == "selective")
            && self.modules.is_empty()
            && self.random_modules.is_none()
        {
            return Err("selective tuning needs --modules or --random-modules".into());
        }
        Ok(())
    }

    /// Whether a method is part of this spec.
    pub fn has(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    /// The peak learning rate: `--lr`, else 1e-4 with full or diff, 3e-2 for prompt and
    /// prefix alone (soft prompts need large steps, as in PEFT's examples), else 1e-3.
    pub fn learning_rate(&self) -> f64 {
        self.lr.unwrap_or(if self.has("full") || self.has("diff") {
            1e-4
        } else if self.methods.iter().all(|m| m == "prompt" || m == "prefix") {
            3e-2
        } else {
            1e-3
        })
    }

    /// The LoRA alpha.
    pub fn lora_alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.rank as f64)
    }
}

/// A training job as queued on the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    /// Base fingerprint.
    pub base: String,
    /// Base name, for people.
    #[serde(default)]
    pub base_name: Option<String>,
    /// Digest of the training JSONL blob.
    pub train: String,
    /// Digest of the evaluation JSONL blob.
    #[serde(default)]
    pub eval: Option<String>,
    /// Frozen deltas to train on top of (`repo@digest`, application order).
    #[serde(default)]
    pub parents: Vec<String>,
    /// What to train.
    pub spec: TrainSpec,
}

/// A verification job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyJob {
    /// Manifest digest of the delta.
    pub manifest: String,
    /// The reference it was submitted as, for people.
    #[serde(default)]
    pub reference: Option<String>,
    /// Digest of the evaluation JSONL blob.
    pub eval: String,
}

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
