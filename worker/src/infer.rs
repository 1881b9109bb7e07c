//! The central delta service: many callers' deltas served over shared bases, in mixed
//! batches (`delta-worker infer`).
//!
//! A call names its deltas by reference. Each reference resolves through the registry
//! with the caller's own token (so the service never runs a delta its caller could not
//! pull), at most once per `resolve_ttl` per caller and reference: a moved tag is seen
//! within that bound, and while the registry is down a caller's earlier resolutions keep
//! serving. Resolved deltas (with their parents) are pulled, verified and kept in memory
//! under a byte budget, least recently used first out.
//!
//! Each base has one batcher thread. Calls queue there as jobs; the batcher gathers jobs
//! for up to `max_wait` or `max_batch` rows, groups rows by delta and runs every group
//! that shares the base in one forward pass ([`crate::mixed`]); a delta that changes the
//! base's weights runs in a pass of its own. Results go back to each job by its rows only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::Device;
use delta_client::hub::Cache;
use delta_client::remote::Remote;
use delta_proto::digest::Digest;
use delta_proto::inference as pb;
use delta_proto::inference::inference_server::{Inference, InferenceServer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::data::{Encoded, Tok};
use crate::mixed::{MixedMounts, Output, forward, forward_alone, shares_base};
use crate::mounts::{HEAD_WEIGHT, Mounts};
use crate::run::{Delta, LocalBase};

/// How the service runs.
#[derive(Debug, Clone)]
pub struct InferOptions {
    /// Folder of base model folders (each with `config.json`, `model.safetensors`,
    /// `tokenizer.json`).
    pub models: PathBuf,
    /// Where to run.
    pub device: Device,
    /// On-disk cache of pulled blobs.
    pub cache: PathBuf,
    /// Bytes of delta tensors kept in memory.
    pub delta_cache_bytes: u64,
    /// Rows a batch gathers at most (one call's inputs are never split).
    pub max_batch: usize,
    /// How long the first job of a batch waits for others.
    pub max_wait: Duration,
    /// How long a caller's resolution of a reference is reused.
    pub resolve_ttl: Duration,
    /// Inputs one call may carry.
    pub max_inputs: usize,
    /// Tokens one input may have (default: the base's `max_position_embeddings`).
    pub max_tokens: Option<usize>,
    /// Jobs waiting per base before calls are refused with `RESOURCE_EXHAUSTED`.
    pub queue: usize,
    /// Run every delta in a pass of its own (the comparison the benchmark makes).
    pub no_mixing: bool,
}

impl InferOptions {
    /// Defaults for a models folder.
    pub fn new(models: PathBuf, cache: PathBuf) -> Self {
        Self {
            models,
            device: Device::Cpu,
            cache,
            delta_cache_bytes: 1 << 30,
            max_batch: 64,
            max_wait: Duration::from_millis(5),
            resolve_ttl: Duration::from_secs(10),
            max_inputs: 256,
            max_tokens: None,
            queue: 1024,
            no_mixing: false,
        }
    }
}

/// Counters of the forward passes run (all bases together).
#[derive(Debug, Default)]
pub struct Stats {
    /// Batches gathered.
    pub batches: AtomicU64,
    /// Forward passes run (a batch runs one mixed pass and one per delta that cannot mix).
    pub passes: AtomicU64,
    /// Rows run.
    pub rows: AtomicU64,
    /// The most distinct deltas (the bare base counts as one) in one forward pass.
    pub max_deltas_in_a_pass: AtomicU64,
}

/// A copy of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Batches gathered.
    pub batches: u64,
    /// Forward passes run.
    pub passes: u64,
    /// Rows run.
    pub rows: u64,
    /// The most distinct deltas in one forward pass.
    pub max_deltas_in_a_pass: u64,
}

/// One base the service holds, with the queue of its batcher.
struct Slot {
    name: String,
    fingerprint: Digest,
    base: Arc<LocalBase>,
    tok: Tok,
    max_tokens: usize,
    queue: SyncSender<Job>,
}

/// One call's rows, waiting for a batch.
struct Job {
    /// Manifest digests of the chain, in mount order (empty: the bare base): rows with the
    /// same key share a segment.
    key: Vec<Digest>,
    chain: Vec<Arc<Delta>>,
    inputs: Vec<Encoded>,
    output: Output,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// What a call ran: its rows' values, the deltas as resolved, the base, the chain.
struct Ran {
    rows: Vec<Vec<f32>>,
    deltas: Vec<pb::ResolvedDelta>,
    slot: Arc<Slot>,
    chain: Vec<Arc<Delta>>,
}

/// A caller's resolution of a reference.
#[derive(Debug, Clone)]
struct Resolution {
    repository: String,
    digest: Digest,
    yanked: bool,
    at: Instant,
}

/// A delta and its parents, in mount order, shared by every job that runs it.
type Chain = Arc<Vec<Arc<Delta>>>;

/// Delta chains in memory, least recently used first out.
#[derive(Default)]
struct DeltaCache {
    used: u64,
    tick: u64,
    /// Chain, its bytes, when last used.
    entries: HashMap<Digest, (Chain, u64, u64)>,
}

impl DeltaCache {
    fn get(&mut self, d: &Digest) -> Option<Chain> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(d).map(|e| {
            e.2 = tick;
            e.0.clone()
        })
    }

    fn insert(&mut self, d: Digest, chain: Chain, bytes: u64, budget: u64) {
        if bytes > budget {
            tracing::warn!(delta = %d, bytes, budget, "delta is larger than the whole delta cache; not kept");
            return;
        }
        self.tick += 1;
        if let Some(old) = self.entries.insert(d, (chain, bytes, self.tick)) {
            self.used -= old.1;
        }
        self.used += bytes;
        while self.used > budget {
            let Some(oldest) = self
                .entries
                .iter()
                .filter(|(k, _)| **k != d)
                .min_by_key(|(_, e)| e.2)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.used -= e.1;
                tracing::debug!(delta = %oldest, bytes = e.1, "evicted from the delta cache");
            }
        }
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct InferenceService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for InferenceService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bases: Vec<&str> = self.inner.slots.iter().map(|s| s.name.as_str()).collect();
        f.debug_struct("InferenceService")
            .field("registry", &self.inner.registry.url())
            .field("bases", &bases)
            .finish()
    }
}

struct Inner {
    registry: Remote,
    cache: Cache,
    slots: Vec<Arc<Slot>>,
    deltas: Mutex<DeltaCache>,
    resolutions: Mutex<HashMap<([u8; 32], String), Resolution>>,
    /// Held while pulling: the on-disk cache resumes one partial file per blob, so two
    /// callers asking for the same new delta (or deltas sharing a parent) must not pull
    /// it at once; the second finds it in memory.
    pulling: tokio::sync::Mutex<()>,
    opts: InferOptions,
    stats: Arc<Stats>,
}

/// Whether an error (from the registry or the network) means the registry could not be
/// reached, rather than that it refused.
fn unreachable(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| match c.downcast_ref::<delta_client::Error>() {
            Some(delta_client::Error::Connect { .. }) => true,
            Some(delta_client::Error::Rpc(s)) => {
                matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
            }
            _ => false,
        })
}

/// The status to answer for an error on the way to running a delta: the registry's own
/// refusal where it refused (not found, denied, no token), `UNAVAILABLE` where it could
/// not be reached.
fn status_of(e: &anyhow::Error) -> Status {
    let message = format!("{e:#}");
    if unreachable(e) {
        // The outermost context says what was being done; the transport's own error is
        // in the log.
        tracing::warn!(error = %message, "registry unreachable");
        return Status::unavailable(format!(
            "{e}: the registry cannot be reached; deltas this service has not loaded for \
             this caller cannot run until it is back"
        ));
    }
    for c in e.chain() {
        if let Some(ce) = c.downcast_ref::<delta_client::Error>() {
            return match ce {
                delta_client::Error::NotFound(_) => Status::not_found(message),
                delta_client::Error::Rejected { code, .. } => Status::new(*code, message),
                delta_client::Error::Rpc(s) => Status::new(s.code(), message),
                delta_client::Error::Integrity { .. } => Status::data_loss(message),
                _ => Status::failed_precondition(message),
            };
        }
    }
    Status::failed_precondition(message)
}

/// The caller's token, from its `authorization: Bearer …` header.
fn caller_token<T>(req: &Request<T>) -> Result<Option<String>, Status> {
    let Some(v) = req.metadata().get("authorization") else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization header is not ASCII"))?;
    let token = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer TOKEN`"))?;
    Ok(Some(token.trim().to_owned()))
}

impl InferenceService {
    /// Opens every base under `opts.models` and starts one batcher thread per base.
    pub fn open(registry: Remote, opts: InferOptions) -> Result<Self> {
        let found = crate::serve::scan_models(&opts.models)?;
        if found.is_empty() {
            anyhow::bail!("{} holds no base model folders", opts.models.display());
        }
        let mut slots = Vec::new();
        let stats = Arc::new(Stats::default());
        let mut found: Vec<(Digest, PathBuf)> = found.into_iter().collect();
        found.sort_by(|a, b| a.1.cmp(&b.1));
        for (fingerprint, dir) in found {
            let base = Arc::new(LocalBase::open_known(&dir, &opts.device, fingerprint)?);
            let limit = base.weights.config.max_position_embeddings;
            let max_tokens = opts.max_tokens.unwrap_or(limit).min(limit);
            // One token past the limit, so an input over it is seen (and refused) rather
            // than silently cut.
            let tok = base.tokenizer(max_tokens + 1)?;
            let (queue, rx) = sync_channel::<Job>(opts.queue.max(1));
            let batcher = Batcher {
                base: base.clone(),
                max_batch: opts.max_batch.max(1),
                max_wait: opts.max_wait,
                mix: !opts.no_mixing,
                stats: stats.clone(),
            };
            std::thread::Builder::new()
                .name("batcher".into())
                .spawn(move || batcher.run(rx))
                .context("starting a batcher thread")?;
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            tracing::info!(base = %name, %fingerprint, "serving base");
            slots.push(Arc::new(Slot {
                name,
                fingerprint,
                base,
                tok,
                max_tokens,
                queue,
            }));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                registry,
                cache: Cache::new(&opts.cache),
                slots,
                deltas: Mutex::new(DeltaCache::default()),
                resolutions: Mutex::new(HashMap::new()),
                pulling: tokio::sync::Mutex::new(()),
                opts,
                stats,
            }),
        })
    }

    /// How many batches and passes have run, and the most deltas one pass mixed.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.inner.stats;
        StatsSnapshot {
            batches: s.batches.load(Ordering::Relaxed),
            passes: s.passes.load(Ordering::Relaxed),
            rows: s.rows.load(Ordering::Relaxed),
            max_deltas_in_a_pass: s.max_deltas_in_a_pass.load(Ordering::Relaxed),
        }
    }

    /// Serves until `shutdown` resolves (health and reflection on, like the registry).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<InferenceServer<InferenceService>>()
            .await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let v1 = reflection().build_v1().context("reflection")?;
        let v1alpha = reflection().build_v1alpha().context("reflection")?;
        tracing::info!(addr = %listener.local_addr()?, "inference service listening");
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(v1)
            .add_service(v1alpha)
            .add_service(InferenceServer::new(self))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown,
            )
            .await
            .context("serving")?;
        Ok(())
    }

    fn slot_named(&self, base: &str) -> Result<Arc<Slot>, Status> {
        self.inner
            .slots
            .iter()
            .find(|s| s.name == base || s.fingerprint.to_string() == base)
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "this service does not hold base {}",
                    delta_proto::excerpt(base)
                ))
            })
    }

    /// Resolves a reference for a caller: the cached resolution while fresh, the
    /// registry's answer otherwise, and the stale one when the registry cannot be reached.
    async fn resolve(
        &self,
        remote: &Remote,
        who: [u8; 32],
        reference: &str,
    ) -> Result<Resolution, Status> {
        let key = (who, reference.to_owned());
        let cached = self
            .inner
            .resolutions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some(r) = &cached
            && r.at.elapsed() < self.inner.opts.resolve_ttl
        {
            return Ok(r.clone());
        }
        match remote.resolve(reference).await {
            Ok(r) => {
                let res = Resolution {
                    repository: r.repository,
                    digest: r.digest,
                    yanked: r.yanked,
                    at: Instant::now(),
                };
                let mut map = self
                    .inner
                    .resolutions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if map.len() > 100_000 {
                    let ttl = self.inner.opts.resolve_ttl;
                    map.retain(|_, r| r.at.elapsed() < ttl);
                }
                map.insert(key, res.clone());
                Ok(res)
            }
            Err(e) => {
                let e = anyhow::Error::new(e)
                    .context(format!("resolving {}", delta_proto::excerpt(reference)));
                if unreachable(&e)
                    && let Some(r) = cached
                {
                    tracing::warn!(reference, error = %format!("{e:#}"), "registry unreachable; serving the last resolution");
                    return Ok(r);
                }
                // A refusal withdraws whatever this caller resolved before.
                self.inner
                    .resolutions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                Err(status_of(&e))
            }
        }
    }

    /// A chain in memory, marked as just used.
    fn cached(&self, digest: &Digest) -> Option<Chain> {
        self.inner
            .deltas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
    }

    /// A resolved delta and its parents, from memory or pulled (verified) from the registry.
    async fn load(&self, remote: &Remote, res: &Resolution) -> Result<Chain, Status> {
        if let Some(chain) = self.cached(&res.digest) {
            return Ok(chain);
        }
        let _pulling = self.inner.pulling.lock().await;
        if let Some(chain) = self.cached(&res.digest) {
            return Ok(chain);
        }
        let pinned = format!("{}@{}", res.repository, res.digest);
        let chain = crate::serve::fetch_chain(remote, &self.inner.cache, &pinned)
            .await
            .map_err(|e| status_of(&e))?;
        let mut bytes = 0u64;
        let mut loaded = Vec::with_capacity(chain.len());
        for mut d in chain {
            d.check_finite()
                .map_err(|e| Status::failed_precondition(format!("{pinned}: {e:#}")))?;
            // Converted once to the f32 the encoder runs in, on the service's device, so a
            // batch mounts it without copies.
            let device = &self.inner.opts.device;
            for t in d.tensors.values_mut() {
                let f = if t.dtype().is_float() {
                    t.to_dtype(candle_core::DType::F32)
                } else {
                    Ok(t.clone())
                };
                *t = f
                    .and_then(|f| f.to_device(device))
                    .map_err(|e| Status::internal(format!("{pinned}: {e}")))?;
                bytes += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
            }
            loaded.push(Arc::new(d));
        }
        let chain = Arc::new(loaded);
        self.inner
            .deltas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                res.digest,
                chain.clone(),
                bytes,
                self.inner.opts.delta_cache_bytes,
            );
        Ok(chain)
    }

    /// Resolves, loads and checks a call's target; tokenises its inputs; runs it in the
    /// base's next batch.
    async fn run<T>(
        &self,
        req: &Request<T>,
        target: Option<pb::Target>,
        inputs: &[pb::Input],
        output: Output,
    ) -> Result<Ran, Status> {
        let target = target.unwrap_or_default();
        check_sizes(&target, inputs, self.inner.opts.max_inputs)?;
        let token = caller_token(req)?;
        let who = *blake3::hash(token.as_deref().unwrap_or("").as_bytes()).as_bytes();
        let remote = self
            .inner
            .registry
            .with_token(token.as_deref())
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let mut resolved = Vec::new();
        let mut chain: Vec<Arc<Delta>> = Vec::new();
        for r in &target.deltas {
            let res = self.resolve(&remote, who, r).await?;
            chain.extend(self.load(&remote, &res).await?.iter().cloned());
            resolved.push(pb::ResolvedDelta {
                reference: r.clone(),
                repository: res.repository.clone(),
                digest: res.digest.to_string(),
                yanked: res.yanked,
            });
        }
        let last = resolved.last().map(|r| r.reference.as_str()).unwrap_or("");
        let slot = self.pick_slot(chain.last(), last, &target.base)?;
        check_runnable(&slot, &chain, output)?;
        let encoded = encode_inputs(&slot, inputs)?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            key: chain.iter().map(|d| d.manifest.digest()).collect(),
            chain: chain.clone(),
            inputs: encoded,
            output,
            reply,
        };
        match slot.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(Status::resource_exhausted(format!(
                    "the service is at its limit of {} waiting calls for this base; retry later",
                    self.inner.opts.queue
                )));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(Status::internal("the base's batcher has stopped"));
            }
        }
        let rows = answer
            .await
            .map_err(|_| Status::internal("the batch was dropped"))?
            .map_err(Status::internal)?;
        if rows.len() != inputs.len() {
            return Err(Status::internal(format!(
                "the batch returned {} rows for {} inputs",
                rows.len(),
                inputs.len()
            )));
        }
        Ok(Ran {
            rows,
            deltas: resolved,
            slot,
            chain,
        })
    }

    /// The base a call runs on: the one its last delta (`reference`) was made for, which
    /// must be the base it names, if it names one; without deltas, the named base, or the
    /// only one this service holds.
    fn pick_slot(
        &self,
        last: Option<&Arc<Delta>>,
        reference: &str,
        named: &str,
    ) -> Result<Arc<Slot>, Status> {
        let slots = &self.inner.slots;
        match (last, named) {
            (Some(d), named) => {
                let fp = d.manifest.base.fingerprint;
                if !named.is_empty() {
                    let s = self.slot_named(named)?;
                    if s.fingerprint != fp {
                        return Err(Status::failed_precondition(format!(
                            "{reference} is a delta for base {fp}, not for {named} ({})",
                            s.fingerprint
                        )));
                    }
                }
                slots
                    .iter()
                    .find(|s| s.fingerprint == fp)
                    .cloned()
                    .ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "this service does not hold base {fp}, which {reference} was made for"
                        ))
                    })
            }
            (None, "") if slots.len() == 1 => Ok(slots[0].clone()),
            (None, "") => Err(Status::invalid_argument(format!(
                "this service holds {} bases; name one (`base`) or a delta",
                slots.len()
            ))),
            (None, named) => self.slot_named(named),
        }
    }
}

/// Refuses a call with no inputs, more than `max_inputs`, or more than 16 deltas.
fn check_sizes(target: &pb::Target, inputs: &[pb::Input], max_inputs: usize) -> Result<(), Status> {
    if inputs.is_empty() {
        return Err(Status::invalid_argument("the request has no inputs"));
    }
    if inputs.len() > max_inputs {
        return Err(Status::invalid_argument(format!(
            "the request has {} inputs; at most {max_inputs} are allowed per call",
            inputs.len()
        )));
    }
    if target.deltas.len() > 16 {
        return Err(Status::invalid_argument(format!(
            "the request composes {} deltas; at most 16 are allowed",
            target.deltas.len()
        )));
    }
    Ok(())
}

/// Mounts the chain once on the slot's base, so a delta this runtime cannot run (or a
/// chain for two bases, or logits without a head) is refused with its reason before it
/// reaches a batch.
fn check_runnable(slot: &Slot, chain: &[Arc<Delta>], output: Output) -> Result<(), Status> {
    for d in chain {
        if d.manifest.base.fingerprint != slot.fingerprint {
            return Err(Status::failed_precondition(format!(
                "the deltas are for different bases ({} and {})",
                d.manifest.base.fingerprint, slot.fingerprint
            )));
        }
    }
    let mut m = Mounts::new(&slot.base.weights);
    for d in chain {
        m.mount(&d.manifest.config, d.tensors.clone())
            .map_err(|e| {
                Status::failed_precondition(format!(
                    "delta {} cannot run here: {e:#}",
                    d.manifest.digest()
                ))
            })?;
    }
    if output == Output::Logits
        && !m.replace.contains_key(HEAD_WEIGHT)
        && !slot.base.weights.tensors.contains_key(HEAD_WEIGHT)
    {
        return Err(Status::failed_precondition(
            "neither the base nor the deltas have a classification head; use Embed",
        ));
    }
    Ok(())
}

/// Tokenises a call's inputs with the slot's tokenizer, refusing any over its token limit.
fn encode_inputs(slot: &Slot, inputs: &[pb::Input]) -> Result<Vec<Encoded>, Status> {
    let mut encoded = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let (ids, type_ids) = slot
            .tok
            .encode(&input.text, input.text_pair.as_deref())
            .map_err(|e| Status::invalid_argument(format!("input {i}: {e:#}")))?;
        if ids.len() > slot.max_tokens {
            return Err(Status::invalid_argument(format!(
                "input {i} is longer than the limit of {} tokens",
                slot.max_tokens
            )));
        }
        encoded.push(Encoded {
            ids,
            type_ids,
            label: None,
        });
    }
    Ok(encoded)
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn predict(
        &self,
        req: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        let (target, inputs) = (req.get_ref().target.clone(), &req.get_ref().inputs);
        let Ran {
            rows,
            deltas,
            slot,
            chain,
        } = self.run(&req, target, inputs, Output::Logits).await?;
        let labels = crate::run::labels_of(&chain).unwrap_or_default();
        let predictions = rows
            .into_iter()
            .map(|logits| {
                let probabilities = crate::train::probabilities(&logits);
                let index = crate::train::argmax(&logits);
                pb::Prediction {
                    label_index: index as u32,
                    label: labels.get(index).cloned().unwrap_or_default(),
                    probabilities,
                    logits,
                }
            })
            .collect();
        Ok(Response::new(pb::PredictResponse {
            predictions,
            labels,
            deltas,
            base: slot.fingerprint.to_string(),
        }))
    }

    async fn embed(
        &self,
        req: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let (target, inputs) = (req.get_ref().target.clone(), &req.get_ref().inputs);
        let normalize = req.get_ref().normalize;
        let Ran {
            rows, deltas, slot, ..
        } = self.run(&req, target, inputs, Output::Embedding).await?;
        let embeddings = rows
            .into_iter()
            .map(|mut values| {
                if normalize {
                    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                    values.iter_mut().for_each(|v| *v /= norm);
                }
                pb::Embedding { values }
            })
            .collect();
        Ok(Response::new(pb::EmbedResponse {
            embeddings,
            deltas,
            base: slot.fingerprint.to_string(),
        }))
    }

    async fn list_bases(
        &self,
        _req: Request<pb::ListBasesRequest>,
    ) -> Result<Response<pb::ListBasesResponse>, Status> {
        let bases = self
            .inner
            .slots
            .iter()
            .map(|s| pb::BaseInfo {
                fingerprint: s.fingerprint.to_string(),
                name: s.name.clone(),
                hidden_size: s.base.weights.config.hidden_size as u32,
                max_tokens: s.max_tokens as u32,
            })
            .collect();
        Ok(Response::new(pb::ListBasesResponse { bases }))
    }
}

/// The thread that gathers one base's jobs into batches and runs them.
struct Batcher {
    base: Arc<LocalBase>,
    max_batch: usize,
    max_wait: Duration,
    mix: bool,
    stats: Arc<Stats>,
}

impl Batcher {
    fn run(self, rx: Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut rows = first.inputs.len();
            let mut jobs = vec![first];
            let deadline = Instant::now() + self.max_wait;
            while rows < self.max_batch {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(j) => {
                        rows += j.inputs.len();
                        jobs.push(j);
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            // A caller that went away needs no rows.
            jobs.retain(|j| !j.reply.is_closed());
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            let (logits, embeddings): (Vec<Job>, Vec<Job>) =
                jobs.into_iter().partition(|j| j.output == Output::Logits);
            for set in [logits, embeddings] {
                if !set.is_empty() {
                    self.run_set(set);
                }
            }
            // A batch's activations are freed now; give the pages back, so that between
            // batches the service holds its bases and deltas, not its last peak.
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only returns free heap memory to the kernel.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Runs jobs that ask for one output: groups by delta, one mixed pass for every group
    /// that shares the base, one pass per group for the others; answers each job with its
    /// own rows.
    fn run_set(&self, jobs: Vec<Job>) {
        let output = jobs[0].output;
        // Groups by delta, in order of first appearance.
        let mut groups: Vec<(Vec<Digest>, Vec<usize>)> = Vec::new();
        for (i, j) in jobs.iter().enumerate() {
            match groups.iter_mut().find(|g| g.0 == j.key) {
                Some(g) => g.1.push(i),
                None => groups.push((j.key.clone(), vec![i])),
            }
        }
        let computed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.compute(&jobs, &groups, output)
        }));
        let per_group = match computed {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let msg = format!("running the batch failed: {e:#}");
                tracing::warn!(error = %msg);
                for j in jobs {
                    let _ = j.reply.send(Err(msg.clone()));
                }
                return;
            }
            Err(_) => {
                tracing::error!("running a batch panicked");
                for j in jobs {
                    let _ = j.reply.send(Err("running the batch failed".into()));
                }
                return;
            }
        };
        // Each group's rows are its jobs' inputs in order: hand them back by count.
        let mut jobs: Vec<Option<Job>> = jobs.into_iter().map(Some).collect();
        for ((_, members), rows) in groups.iter().zip(per_group) {
            let mut rows = rows.into_iter();
            for &i in members {
                if let Some(j) = jobs[i].take() {
                    let mine: Vec<Vec<f32>> = rows.by_ref().take(j.inputs.len()).collect();
                    let _ = j.reply.send(Ok(mine));
                }
            }
        }
    }

    fn counted(&self, rows: usize, deltas: usize) {
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        self.stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.stats
            .max_deltas_in_a_pass
            .fetch_max(deltas as u64, Ordering::Relaxed);
    }

    fn compute(
        &self,
        jobs: &[Job],
        groups: &[(Vec<Digest>, Vec<usize>)],
        output: Output,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let weights = &self.base.weights;
        let cfg = &weights.config;
        let device = &weights.device;
        let mounts: Vec<Mounts<'_>> = groups
            .iter()
            .map(|(_, members)| {
                let mut m = Mounts::new(weights);
                for d in &jobs[members[0]].chain {
                    m.mount(&d.manifest.config, d.tensors.clone())?;
                }
                Ok(m)
            })
            .collect::<Result<_>>()?;
        let rows_of = |members: &[usize]| -> Vec<&Encoded> {
            members
                .iter()
                .flat_map(|&i| jobs[i].inputs.iter())
                .collect()
        };
        let mut out: Vec<Option<Vec<Vec<f32>>>> = vec![None; groups.len()];
        let shared: Vec<usize> = (0..groups.len())
            .filter(|&g| self.mix && shares_base(&mounts[g]))
            .collect();
        if !shared.is_empty() {
            let mut parts = Vec::new();
            let mut rows = Vec::new();
            for &g in &shared {
                let r = rows_of(&groups[g].1);
                parts.push((r.len(), &mounts[g]));
                rows.extend(r);
            }
            let mixed = MixedMounts::new(&parts)?;
            self.counted(rows.len(), shared.len());
            let batch = crate::data::batch(&rows, device)?;
            for (&g, values) in shared.iter().zip(forward(cfg, &mixed, &batch, output)?) {
                out[g] = Some(values);
            }
        }
        for (g, (_, members)) in groups.iter().enumerate() {
            if out[g].is_none() {
                let rows = rows_of(members);
                self.counted(rows.len(), 1);
                let batch = crate::data::batch(&rows, device)?;
                out[g] = Some(forward_alone(cfg, &mounts[g], &batch, output)?);
            }
        }
        out.into_iter()
            .map(|o| o.context("a group was not run"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u8) -> Digest {
        Digest::of(&[i])
    }

    #[test]
    fn the_delta_cache_keeps_its_budget_and_drops_the_least_recently_used() {
        let mut c = DeltaCache::default();
        let chain = || Arc::new(Vec::new());
        c.insert(digest(1), chain(), 60, 100);
        c.insert(digest(2), chain(), 30, 100);
        assert!(c.get(&digest(1)).is_some());
        // 60 + 30 + 30 > 100: the least recently used (2) leaves, not 1.
        c.insert(digest(3), chain(), 30, 100);
        assert!(c.get(&digest(2)).is_none());
        assert!(c.get(&digest(1)).is_some() && c.get(&digest(3)).is_some());
        assert_eq!(c.used, 90);
        // Larger than the whole budget: served by the caller, never kept.
        c.insert(digest(4), chain(), 101, 100);
        assert!(c.get(&digest(4)).is_none());
        assert_eq!(c.used, 90);
        // Re-inserting counts once.
        c.insert(digest(3), chain(), 30, 100);
        assert_eq!(c.used, 90);
    }
}
