//! Jobs as the registry's queue, the workers and the CLI reason about them: kinds and
//! states (the wire's `JobInfo.kind`, `.state` and the database carry their names) and
//! the specs that travel as JSON in `SubmitJobRequest.spec`, which the registry parses
//! and checks ([`JobSpec::parse`]) before it queues a job.

use serde::{Deserialize, Serialize};

use crate::UnknownName;
use crate::digest::Digest;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobKind {
    /// Train a delta and publish it.
    Train,
    /// Re-evaluate a published delta and attach a report to it.
    Verify,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Leased by a worker (until its lease expires).
    Running,
    /// Done: the result is published.
    Succeeded,
    /// Given up: the error says why.
    Failed,
}

names!(JobKind, "job kind", Train => "train", Verify => "verify");
names!(
    JobState,
    "job state",
    Queued => "queued",
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed"
);

impl JobState {
    /// Whether the job will not change again.
    pub const fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// A job as the registry reports it (`JobInfo` on the wire).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Its number.
    pub id: u64,
    /// What it does.
    pub kind: JobKind,
    /// Where it is.
    pub state: JobState,
    /// The spec, as queued (JSON, every default written out).
    pub spec: String,
    /// The repository it publishes to (train) or the version it verifies (verify).
    pub repository: String,
    /// Tags a trained delta gets.
    pub tags: Vec<String>,
    /// Leases taken so far.
    pub attempts: u32,
    /// The worker that holds or held it (empty: none yet).
    pub worker: String,
    /// JSON: train: `{repository, version, digest}`; verify: the report (empty until done).
    pub result: String,
    /// Why it failed (empty unless failed).
    pub error: String,
    /// Unix seconds it was submitted.
    pub created: i64,
    /// Unix seconds it last changed.
    pub updated: i64,
    /// Unix seconds the current lease ends, if one is held.
    pub lease_expires: Option<i64>,
}

impl TryFrom<crate::JobInfo> for Job {
    type Error = UnknownName;

    fn try_from(j: crate::JobInfo) -> Result<Self, UnknownName> {
        Ok(Job {
            id: j.id,
            kind: j.kind.parse()?,
            state: j.state.parse()?,
            spec: j.spec,
            repository: j.repository,
            tags: j.tags,
            attempts: j.attempts,
            worker: j.worker,
            result: j.result,
            error: j.error,
            created: j.created,
            updated: j.updated,
            lease_expires: (j.lease_expires != 0).then_some(j.lease_expires),
        })
    }
}

/// One progress event of a job (`JobEvent` on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// Its sequence number within the job.
    pub seq: u64,
    /// Unix seconds.
    pub at: i64,
    /// JSON progress (`delta_client::jobs::Progress`).
    pub body: String,
}

impl From<crate::JobEvent> for JobEvent {
    fn from(e: crate::JobEvent) -> Self {
        JobEvent {
            seq: e.seq,
            at: e.at,
            body: e.body,
        }
    }
}

/// A training method the worker runs (`--method`, `spec.methods`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Low-rank updates of the target modules' weights.
    Lora,
    /// Bottleneck adapters (Houlsby or Pfeiffer).
    Adapter,
    /// Every bias.
    Bitfit,
    /// Per-layer key/value prefixes.
    Prefix,
    /// Soft prompt tokens.
    Prompt,
    /// The last encoder layer.
    LastLayer,
    /// Chosen modules, whole.
    Selective,
    /// A sparse difference on the target modules' weights (diff pruning).
    Diff,
    /// Every weight (full fine-tuning).
    Full,
}

names!(
    Method,
    "method",
    Lora => "lora",
    Adapter => "adapter",
    Bitfit => "bitfit",
    Prefix => "prefix",
    Prompt => "prompt",
    LastLayer => "last-layer",
    Selective => "selective",
    Diff => "diff",
    Full => "full"
);

/// What to train and how: methods, their settings and the optimiser's hyper-parameters.
/// The same flags serve `delta train` (through the registry) and `delta-worker train`
/// (local).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Methods, comma-separated; several train at once (e.g. `prompt,bitfit,adapter`):
    /// lora, adapter, bitfit, prefix, prompt, last-layer, selective, diff, full.
    #[arg(long = "method", value_delimiter = ',', required = true)]
    pub methods: Vec<Method>,
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
    pub fn new(methods: &[Method]) -> Self {
        Self {
            methods: methods.to_vec(),
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
        if self.has(Method::Selective) && self.modules.is_empty() && self.random_modules.is_none() {
            return Err("selective tuning needs --modules or --random-modules".into());
        }
        Ok(())
    }

    /// Whether a method is part of this spec.
    pub fn has(&self, method: Method) -> bool {
        self.methods.contains(&method)
    }

    /// The peak learning rate: `--lr`, else 1e-4 with full or diff, 3e-2 for prompt and
    /// prefix alone (soft prompts need large steps, as in PEFT's examples), else 1e-3.
    pub fn learning_rate(&self) -> f64 {
        self.lr
            .unwrap_or(if self.has(Method::Full) || self.has(Method::Diff) {
                1e-4
            } else if self
                .methods
                .iter()
                .all(|m| matches!(m, Method::Prompt | Method::Prefix))
            {
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
#[serde(deny_unknown_fields)]
pub struct TrainJob {
    /// Base fingerprint.
    pub base: Digest,
    /// Base name, for people.
    #[serde(default)]
    pub base_name: Option<String>,
    /// Digest of the training JSONL blob.
    pub train: Digest,
    /// Digest of the evaluation JSONL blob.
    #[serde(default)]
    pub eval: Option<Digest>,
    /// Frozen deltas to train on top of (`repo@digest`, application order).
    #[serde(default)]
    pub parents: Vec<String>,
    /// What to train.
    pub spec: TrainSpec,
}

/// A verification job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyJob {
    /// Manifest digest of the delta (the registry writes the one the reference resolves
    /// to when the job is queued).
    pub manifest: Digest,
    /// The reference it was submitted as, for people.
    #[serde(default)]
    pub reference: Option<String>,
    /// Digest of the evaluation JSONL blob.
    pub eval: Digest,
}

/// A job's spec, parsed by its kind.
#[derive(Debug, Clone, PartialEq)]
pub enum JobSpec {
    /// What a training job runs (boxed: it is six times the size of a verification).
    Train(Box<TrainJob>),
    /// What a verification job runs.
    Verify(VerifyJob),
}

/// Parses a spec, naming the field a wrong value is in (`spec.rank: invalid type: …`).
fn from_json<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, SpecError> {
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(json)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        SpecError(crate::excerpt(&if path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        }))
    })
}

/// A job spec that does not parse or asks for settings no run could use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job spec: {0}")]
pub struct SpecError(String);

impl JobSpec {
    /// Parses a spec of `kind` from its JSON and checks its settings: unknown fields, a
    /// missing dataset or a value out of range are refused, named.
    pub fn parse(kind: JobKind, json: &str) -> Result<Self, SpecError> {
        match kind {
            JobKind::Train => {
                let job: TrainJob = from_json(json)?;
                job.spec.check().map_err(SpecError)?;
                Ok(JobSpec::Train(Box::new(job)))
            }
            JobKind::Verify => Ok(JobSpec::Verify(from_json(json)?)),
        }
    }

    /// The spec as the queue stores it (every default written out).
    pub fn to_json(&self) -> String {
        match self {
            JobSpec::Train(j) => serde_json::to_string(j),
            JobSpec::Verify(j) => serde_json::to_string(j),
        }
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for &k in JobKind::ALL {
            assert_eq!(k.as_str().parse::<JobKind>(), Ok(k));
        }
        for s in ["queued", "running", "succeeded", "failed"] {
            assert_eq!(s.parse::<JobState>().map(JobState::as_str), Ok(s));
        }
        assert_eq!(
            "deploy".parse::<JobKind>().unwrap_err().to_string(),
            "job kind \"deploy\" is not one of train, verify"
        );
        assert!("done".parse::<JobState>().is_err());
        assert!(JobState::Failed.is_final() && !JobState::Running.is_final());
    }

    #[test]
    fn specs_are_parsed_and_checked_by_kind() {
        let base = crate::digest::Digest::of(b"base").to_string();
        let train = crate::digest::Digest::of(b"train").to_string();
        let job = serde_json::json!({"base": base, "train": train, "spec": {"methods": ["lora"]}});
        let JobSpec::Train(parsed) = JobSpec::parse(JobKind::Train, &job.to_string()).unwrap()
        else {
            panic!("a training spec");
        };
        assert_eq!(
            parsed.spec,
            TrainSpec::new(&[Method::Lora]),
            "defaults filled in"
        );
        let again = JobSpec::parse(JobKind::Train, &JobSpec::Train(parsed.clone()).to_json());
        assert_eq!(again, Ok(JobSpec::Train(parsed)));
        for (spec, error) in [
            (serde_json::json!({}), "missing field `base`"),
            (
                serde_json::json!({"base": base, "train": train, "spec": {"methods": ["lora"], "rnak": 4}}),
                "unknown field `rnak`",
            ),
            (
                serde_json::json!({"base": base, "train": train, "spec": {"methods": ["lora"], "rank": 0}}),
                "job spec: --rank must be at least 1",
            ),
            (
                serde_json::json!({"base": base, "train": train, "spec": {"methods": ["dora"]}}),
                "spec.methods[0]: unknown variant `dora`",
            ),
            (serde_json::json!({"base": base}), "missing field `train`"),
            (
                serde_json::json!({"base": base, "train": "sha256:00", "spec": {"methods": ["lora"]}}),
                "train: digest \"sha256:00\" must start with \"blake3:\"",
            ),
            (
                serde_json::json!({"base": "blake3:12", "train": train, "spec": {"methods": ["lora"]}}),
                "base: digest \"blake3:12\" must be \"blake3:\" followed by 64",
            ),
        ] {
            let e = JobSpec::parse(JobKind::Train, &spec.to_string())
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("job spec: ") && e.contains(error),
                "{spec}: {e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let e = JobSpec::parse(JobKind::Verify, "{\"eval\": 3}").unwrap_err();
        assert!(
            e.to_string().starts_with("job spec: eval: invalid type"),
            "{e}"
        );
    }
}
