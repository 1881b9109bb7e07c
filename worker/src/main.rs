//! `delta-worker`: serve jobs from a registry, or train, predict and make data locally.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::{Parser, Subcommand};
use delta_client::jobs::TrainSpec;
use delta_worker::data::{Split, load_jsonl, sentiment_split, to_jsonl};
use delta_worker::fused::Precision;
use delta_worker::run::{Delta, LocalBase, TrainRequest, predict, train_to_dir};

#[derive(Parser, Debug)]
#[command(
    name = "delta-worker",
    version,
    about = "Train, verify and run deltas with candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Lease jobs from a registry and run them.
    Serve(ServeArgs),
    /// Serve many callers' deltas over shared bases (gRPC `delta.inference.v1`), batching
    /// calls for different deltas into one forward pass.
    Infer(InferArgs),
    /// Train a delta locally, without a registry.
    Train(Box<TrainArgs>),
    /// Run a base with deltas mounted (native folders, in order) and print predictions.
    Predict(PredictArgs),
    /// Write the synthetic sentiment dataset as JSONL.
    GenData(GenDataArgs),
    /// Write a tiny random base model folder (for tests and experiments).
    TinyBase {
        /// Output folder.
        out: PathBuf,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// `--device`, for every command that runs a model.
#[derive(clap::Args, Debug)]
struct DeviceArg {
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// `--precision`, for the commands that train.
#[derive(clap::Args, Debug)]
struct PrecisionArg {
    /// Training products: `f32`, or `bf16` (mixed precision for GPUs: bf16 operands and
    /// base weights; f32 results, norms, softmax and master values; recorded in the delta).
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Registry URL.
    #[arg(long, env = "DELTA_REGISTRY", default_value = "http://127.0.0.1:50051")]
    registry: String,
    /// A worker token (`delta-registry token create --worker --namespace NS --scope write`;
    /// `--scope read` verifies only).
    #[arg(long, env = "DELTA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate for a TLS registry.
    #[arg(long, env = "DELTA_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Folder of base model folders.
    #[arg(long)]
    models: PathBuf,
    #[command(flatten)]
    device: DeviceArg,
    /// Cache for datasets and deltas.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Name recorded on jobs (default: host and process id).
    #[arg(long)]
    name: Option<String>,
    /// Lease length in seconds (renewed every third of it).
    #[arg(long, default_value_t = 60)]
    lease_seconds: u32,
    /// Stop after this many jobs.
    #[arg(long)]
    max_jobs: Option<usize>,
    /// Train up to this many queued training jobs on one base together, in mixed
    /// batches (one forward and backward pass for all; each job its own optimiser,
    /// schedule, data order, lease and result).
    #[arg(long, default_value_t = 1)]
    co_train: usize,
    #[command(flatten)]
    precision: PrecisionArg,
}

#[derive(clap::Args, Debug)]
struct InferArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: String,
    /// Registry the deltas come from. Each call's references resolve with the
    /// caller's own token (its `authorization` header).
    #[arg(long, env = "DELTA_REGISTRY", default_value = "http://127.0.0.1:50051")]
    registry: String,
    /// CA certificate for a TLS registry.
    #[arg(long, env = "DELTA_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Folder of base model folders; every base in it is served.
    #[arg(long)]
    models: PathBuf,
    #[command(flatten)]
    device: DeviceArg,
    /// Cache for pulled deltas (on disk).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Bytes of delta tensors kept in memory (least recently used leave first).
    #[arg(long, default_value_t = 1 << 30)]
    delta_cache_bytes: u64,
    /// Rows one batch gathers at most.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Milliseconds the first call of a batch waits for others.
    #[arg(long, default_value_t = 5)]
    max_wait_ms: u64,
    /// Seconds a caller's resolution of a reference is reused (a moved tag is seen
    /// within this; while the registry is down, the last one keeps serving).
    #[arg(long, default_value_t = 10)]
    resolve_ttl_seconds: u64,
    /// Inputs one call may carry.
    #[arg(long, default_value_t = 256)]
    max_inputs: usize,
    /// Tokens one input may have (default and ceiling: the base's positions).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Run each delta in a forward pass of its own (no mixed batches).
    #[arg(long)]
    no_mixing: bool,
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Base model folder.
    #[arg(long)]
    base: PathBuf,
    /// Training JSONL.
    #[arg(long)]
    train: PathBuf,
    /// Evaluation JSONL.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Output folder (native delta).
    #[arg(long)]
    out: PathBuf,
    /// Frozen native delta folders to train on top of, in order.
    #[arg(long = "parent")]
    parents: Vec<PathBuf>,
    #[command(flatten)]
    device: DeviceArg,
    #[command(flatten)]
    precision: PrecisionArg,
    #[command(flatten)]
    spec: TrainSpec,
}

#[derive(clap::Args, Debug)]
struct PredictArgs {
    /// Base model folder (an applied model folder works too).
    #[arg(long)]
    base: PathBuf,
    /// Deltas, mounted in order: native folders, or registry references (pulled with
    /// their parents, which mount first).
    deltas: Vec<String>,
    /// Registry for references.
    #[arg(long, env = "DELTA_REGISTRY", default_value = "http://127.0.0.1:50051")]
    registry: String,
    /// Token for references in private namespaces.
    #[arg(long, env = "DELTA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Cache for pulled deltas.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Input JSONL ({"text": …}; labels optional).
    #[arg(long)]
    input: PathBuf,
    /// Truncate inputs to this many tokens.
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(clap::Args, Debug)]
struct GenDataArgs {
    /// Examples.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The easy variant (no negation) that tiny random models can learn.
    #[arg(long)]
    simple: bool,
    /// `train` or `eval`: the task's sentences are split once, by a hash of the text,
    /// so no evaluation sentence ever appears in a training file (whatever the seeds).
    #[arg(long, value_enum, default_value = "train")]
    split: SplitArg,
}

/// Where datasets and pulled deltas are cached unless `--cache` says otherwise.
fn default_cache() -> PathBuf {
    std::env::temp_dir().join("delta-worker-cache")
}

impl DeviceArg {
    /// The device, and its name as recorded on jobs.
    fn open(&self) -> Result<(Device, String)> {
        let spec = self.device.as_str();
        if spec == "cpu" {
            return Ok((Device::Cpu, "cpu".into()));
        }
        if let Some(n) = spec.strip_prefix("cuda:") {
            let n: usize = n.parse().with_context(|| format!("bad device {spec}"))?;
            if !candle_core::utils::cuda_is_available() {
                bail!("device {spec}: this build has no CUDA support (build with --features cuda)");
            }
            // candle's error carries a multi-line backtrace: one line says it all.
            let device = Device::new_cuda(n).map_err(|e| {
                let msg = e.to_string();
                anyhow::anyhow!(
                    "--device {spec}: no CUDA device: {}",
                    msg.lines().next().unwrap_or_default()
                )
            })?;
            return Ok((device, spec.to_owned()));
        }
        bail!("device {spec:?} is not cpu or cuda:N")
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Training keeps its large activation buffers between steps; a service keeps only
    // its base and deltas, and glibc's defaults give the rest back.
    if !matches!(cli.command, Command::Infer(_)) {
        delta_worker::alloc::tune_for_training();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", delta_proto::error_line(e.chain()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(a) => serve(a).await,
        Command::Infer(a) => infer(a).await,
        Command::Train(a) => train(*a),
        Command::Predict(a) => predict_cmd(a).await,
        Command::GenData(a) => {
            let split = match a.split {
                SplitArg::Train => Split::Train,
                SplitArg::Eval => Split::Eval,
            };
            print!(
                "{}",
                to_jsonl(&sentiment_split(a.n, a.seed, !a.simple, split))
            );
            Ok(())
        }
        Command::TinyBase { out, seed } => delta_worker::tiny::write_base(&out, seed),
    }
}

/// `serve`: lease jobs and run them until stopped (or `--max-jobs`).
async fn serve(a: ServeArgs) -> Result<()> {
    let (device, device_name) = a.device.open()?;
    let opts = delta_client::remote::ConnectOptions {
        token: a.token,
        ca_cert: a.ca_cert,
        lazy: false,
    };
    let remote = delta_client::Remote::connect_opts(&a.registry, &opts).await?;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
    let serve = delta_worker::serve::ServeOptions {
        models: a.models,
        cache: a.cache.unwrap_or_else(default_cache),
        device,
        device_name,
        name: a
            .name
            .unwrap_or_else(|| format!("{host}/{}", std::process::id())),
        lease_seconds: a.lease_seconds,
        poll: Duration::from_millis(250),
        max_jobs: a.max_jobs,
        co_train: a.co_train.max(1),
        precision: a.precision.precision,
    };
    delta_worker::serve::serve(remote, serve).await
}

/// `infer`: the inference service, until Ctrl-C.
async fn infer(a: InferArgs) -> Result<()> {
    let (device, _) = a.device.open()?;
    let opts = delta_client::remote::ConnectOptions {
        token: None,
        ca_cert: a.ca_cert,
        lazy: true,
    };
    let remote = delta_client::Remote::connect_opts(&a.registry, &opts).await?;
    let mut o =
        delta_worker::infer::InferOptions::new(a.models, a.cache.unwrap_or_else(default_cache));
    o.device = device;
    o.delta_cache_bytes = a.delta_cache_bytes;
    o.max_batch = a.max_batch;
    o.max_wait = Duration::from_millis(a.max_wait_ms);
    o.resolve_ttl = Duration::from_secs(a.resolve_ttl_seconds);
    o.max_inputs = a.max_inputs;
    o.max_tokens = a.max_tokens;
    o.no_mixing = a.no_mixing;
    let service =
        tokio::task::block_in_place(|| delta_worker::infer::InferenceService::open(remote, o))?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    service
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

/// `train`: one delta from local files; metrics on stdout, progress on stderr.
fn train(a: TrainArgs) -> Result<()> {
    let (device, _) = a.device.open()?;
    let mut base = LocalBase::open(&a.base, &device)?;
    base.weights.set_precision(a.precision.precision)?;
    let train = load_jsonl(&a.train)?;
    let eval = a.eval.as_deref().map(load_jsonl).transpose()?;
    let parents = a
        .parents
        .iter()
        .map(|p| Delta::load_dir(p))
        .collect::<Result<Vec<_>>>()?;
    let req = TrainRequest {
        spec: &a.spec,
        parents: &parents,
        train: &train,
        eval: eval.as_deref(),
        base_name: None,
        provenance: Default::default(),
    };
    let trained = tokio::task::block_in_place(|| {
        train_to_dir(&base, &req, &a.out, &mut |p| {
            eprintln!("{p}");
            Ok(())
        })
    })?;
    println!("{}", serde_json::to_string_pretty(&trained.metrics)?);
    eprintln!("wrote {} ({})", a.out.display(), trained.manifest.digest());
    Ok(())
}

/// `predict`: one JSON line per input.
async fn predict_cmd(a: PredictArgs) -> Result<()> {
    let (device, _) = a.device.open()?;
    let base = LocalBase::open(&a.base, &device)?;
    let mut chain = Vec::new();
    let mut remote = None;
    let cache = delta_client::Cache::new(&a.cache.unwrap_or_else(default_cache));
    for d in &a.deltas {
        if std::path::Path::new(d).is_dir() {
            chain.push(Delta::load_dir(std::path::Path::new(d))?);
            continue;
        }
        if remote.is_none() {
            let opts = delta_client::remote::ConnectOptions {
                token: a.token.clone(),
                ca_cert: None,
                lazy: false,
            };
            remote = Some(delta_client::Remote::connect_opts(&a.registry, &opts).await?);
        }
        if let Some(r) = &remote {
            chain.extend(delta_worker::serve::fetch_chain(r, &cache, d).await?);
        }
    }
    let examples = load_jsonl(&a.input)?;
    let out = tokio::task::block_in_place(|| predict(&base, &chain, &examples, a.max_len, 32))?;
    let mut stdout = std::io::stdout().lock();
    for v in out {
        writeln!(stdout, "{v}")?;
    }
    Ok(())
}

/// `gen-data --split`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SplitArg {
    Train,
    Eval,
}
