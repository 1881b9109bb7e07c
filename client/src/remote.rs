//! [`Remote`]: a typed wrapper over the generated `RegistryClient`. The only client module
//! that touches generated types.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
pub use delta_proto::catalog::BaseRecord;
use delta_proto::catalog::{DeltaSummary, RepoSummary, Report, VersionInfo};
use delta_proto::fingerprint::FingerprintEntry;
use delta_proto::jobs::{Job, JobEvent, JobKind};
use delta_proto::manifest::Manifest;
use delta_proto::registry_client::RegistryClient;
use delta_proto::tokens::{CallerKind, Scope};
use delta_proto::{self as pb, CHUNK_SIZE, Digest};
use futures::Stream;
use indicatif::ProgressBar;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::error::{Error, IoContext, Result};

mod chunks;
mod details;
use chunks::Piece;
pub(crate) use details::NoDetails;

/// How many times an upload or download resumes after a broken stream before giving up.
const RESUMES: usize = 5;

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Debug, Clone)]
pub(crate) struct Auth(pub(crate) Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// How to connect.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// API token sent with every call.
    pub token: Option<String>,
    /// A PEM CA certificate to trust for `https://` registries (besides the web PKI).
    pub ca_cert: Option<std::path::PathBuf>,
    /// Connect on first use instead of now (and again after a failure): for a service
    /// that must start, and keep serving what it has, while the registry is down.
    pub lazy: bool,
}

/// A connection to a registry.
#[derive(Debug, Clone)]
pub struct Remote {
    client: RegistryClient<InterceptedService<NoDetails<Channel>, Auth>>,
    /// The connection under `client`, for the hand-read `DownloadBlob`.
    channel: NoDetails<Channel>,
    auth: Auth,
    url: String,
}

/// A resolved reference.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// `namespace/name`.
    pub repository: String,
    /// Version number.
    pub version: u64,
    /// Manifest digest (checked against the manifest bytes).
    pub digest: Digest,
    /// The manifest.
    pub manifest: Manifest,
    /// Tags pointing at this version.
    pub tags: Vec<String>,
    /// The version is yanked (its publisher withdrew it; a tag or number still reaches it).
    pub yanked: bool,
}

/// Who the registry takes the caller for (`delta whoami`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoAmI {
    /// Open (no tokens exist: everything allowed), anonymous (no token sent), a user's or
    /// a worker's token.
    pub kind: CallerKind,
    /// The token's id (0 without a token).
    pub token_id: u64,
    /// The token's namespace, or `*`.
    pub namespace: String,
    /// What the caller may do (`None`: anonymous, public namespaces only).
    pub scope: Option<Scope>,
    /// Unix seconds the token expires (`None`: never).
    pub expires_at: Option<i64>,
}

/// An endpoint for `url`: a 10 s connect timeout, no Nagle delay, and for `https://` TLS
/// trusting the public web PKI and, if given, `ca_cert` (the registry's and a worker's
/// inference service's clients both connect through it).
pub(crate) fn endpoint(url: &str, ca_cert: Option<&Path>) -> Result<Endpoint> {
    let connect_err = |source| Error::Connect {
        url: url.to_owned(),
        source,
    };
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(connect_err)?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let mut tls = ClientTlsConfig::new().with_webpki_roots();
    if let Some(ca) = ca_cert {
        tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca).at(ca)?));
    }
    endpoint.tls_config(tls).map_err(connect_err)
}

/// A failed connection, in plain words where the cause is a known setup mistake.
pub(crate) fn connect_error(url: &str, source: tonic::transport::Error) -> Error {
    let mut chain = format!("{source:?}");
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(&source);
    while let Some(c) = cause {
        chain.push_str(&format!(" {c:?}"));
        cause = c.source();
    }
    if chain.contains("CaUsedAsEndEntity") {
        return Error::Invalid(format!(
            "cannot connect to {url}: its TLS certificate is a CA certificate \
             (basicConstraints CA:TRUE, what a bare `openssl req -x509` makes), and TLS refuses \
             a CA certificate as a server's own. Give the server an end-entity certificate: \
             `delta-registry tls self-signed --out DIR --name HOST` writes one (trust it with \
             --ca-cert DIR/cert.pem), or add `-addext basicConstraints=critical,CA:FALSE` to \
             the openssl command"
        ));
    }
    Error::Connect {
        url: url.to_owned(),
        source,
    }
}

pub(crate) fn bearer(token: Option<&str>) -> Result<Option<MetadataValue<Ascii>>> {
    token
        .map(|t| {
            format!("Bearer {}", t.trim())
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| {
                    Error::Invalid("the token has characters a header cannot carry".into())
                })
        })
        .transpose()
}

fn digest(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e| Error::Invalid(format!("registry sent a malformed digest: {e}")))
}

impl Remote {
    /// Connects to `url` (`http://host:port`) without a token.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, None).await
    }

    /// Connects to `url`, sending `token` (if any) with every call.
    pub async fn connect_with(url: &str, token: Option<&str>) -> Result<Self> {
        Self::connect_opts(
            url,
            &ConnectOptions {
                token: token.map(str::to_owned),
                ca_cert: None,
                lazy: false,
            },
        )
        .await
    }

    /// Connects with explicit options. `https://` URLs use TLS, trusting the public web PKI
    /// and, if given, a custom CA.
    pub async fn connect_opts(url: &str, opts: &ConnectOptions) -> Result<Self> {
        let token = opts.token.as_deref();
        let auth = bearer(token)?;
        // Blob streams want large windows and frames.
        let endpoint = endpoint(url, opts.ca_cert.as_deref())?
            .initial_stream_window_size(Some(delta_proto::HTTP2_STREAM_WINDOW))
            .initial_connection_window_size(Some(delta_proto::HTTP2_CONNECTION_WINDOW))
            .max_frame_size(Some(delta_proto::HTTP2_MAX_FRAME));
        let channel = if opts.lazy {
            endpoint.connect_lazy()
        } else {
            endpoint
                .connect()
                .await
                .map_err(|source| connect_error(url, source))?
        };
        Ok(Self::over(channel, Auth(auth), url))
    }

    fn over(channel: Channel, auth: Auth, url: &str) -> Self {
        let channel = NoDetails(channel);
        let client = RegistryClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20);
        Self {
            client,
            channel,
            auth,
            url: url.to_owned(),
        }
    }

    /// The same connection sending another token (or none) with every call: a service
    /// that acts for its callers (the worker's inference service) asks with each one's
    /// own token, over one shared connection.
    pub fn with_token(&self, token: Option<&str>) -> Result<Self> {
        Ok(Self::over(
            self.channel.0.clone(),
            Auth(bearer(token)?),
            &self.url,
        ))
    }

    /// The registry URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Which of `digests` the registry lacks.
    pub async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let req = pb::MissingBlobsRequest {
            digests: digests.iter().map(ToString::to_string).collect(),
        };
        let resp = self.client.clone().missing_blobs(req).await?.into_inner();
        resp.missing.iter().map(|d| digest(d)).collect()
    }

    /// Opens an upload session. `None` when the registry already has the blob.
    pub async fn start_upload(&self, blob: Digest, size: u64) -> Result<Option<(String, u64)>> {
        let resp = self
            .client
            .clone()
            .start_upload(pb::StartUploadRequest {
                digest: blob.to_string(),
                size,
            })
            .await?
            .into_inner();
        Ok((!resp.present).then_some((resp.upload_id, resp.offset)))
    }

    /// Where an upload session stands.
    pub async fn upload_offset(&self, upload_id: &str) -> Result<u64> {
        let req = pb::GetUploadRequest {
            upload_id: upload_id.to_owned(),
        };
        Ok(self
            .client
            .clone()
            .get_upload(req)
            .await?
            .into_inner()
            .offset)
    }

    /// Sends a raw stream of chunks to a session. Returns `(committed, offset)`.
    pub async fn upload_stream(
        &self,
        chunks: impl Stream<Item = pb::UploadChunk> + Send + 'static,
    ) -> Result<(bool, u64)> {
        let resp = self.client.clone().upload_blob(chunks).await?.into_inner();
        Ok((resp.committed, resp.offset))
    }

    /// Uploads a file as blob `blob`, resuming where the registry stands after a broken
    /// stream. Returns the bytes actually sent (0 when the registry had it).
    pub async fn upload_file(
        &self,
        path: &Path,
        blob: Digest,
        size: u64,
        progress: &ProgressBar,
    ) -> Result<u64> {
        let Some((upload_id, mut offset)) = self.start_upload(blob, size).await? else {
            progress.inc(size);
            return Ok(0);
        };
        progress.inc(offset);
        let mut sent = 0;
        for attempt in 0..=RESUMES {
            let start = offset;
            let chunks = file_chunks(
                path.to_owned(),
                upload_id.clone(),
                offset,
                size,
                progress.clone(),
            );
            match self.upload_stream(chunks).await {
                Ok((true, end)) => return Ok(sent + end - start),
                Ok((false, at)) => {
                    sent += at - start;
                    offset = at;
                }
                Err(Error::Rpc(s)) if attempt < RESUMES && is_transient(s.code()) => {
                    tracing::warn!(blob = %blob, error = %s, "upload interrupted; resuming");
                    // A session the registry dropped cannot resume: what ended it (a full
                    // disk, say) is the error to show, not "upload not found".
                    let Ok(at) = self.upload_offset(&upload_id).await else {
                        return Err(Error::Rpc(s));
                    };
                    sent += at.saturating_sub(start);
                    progress.set_position(
                        progress
                            .position()
                            .saturating_sub(offset.saturating_sub(at)),
                    );
                    offset = at;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Invalid(format!(
            "upload of {blob} did not complete after {RESUMES} resumes"
        )))
    }

    /// Downloads a blob into `partial`, resuming from its current length, and verifies the
    /// whole file's blake3 against `blob` (hashing while writing; a resumed prefix is
    /// re-hashed from disk first). Returns the bytes transferred.
    pub async fn download_to(
        &self,
        blob: Digest,
        partial: &Path,
        progress: &ProgressBar,
    ) -> Result<u64> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(partial)
            .at(partial)?;
        let mut hasher = blake3::Hasher::new();
        let prefix = file.metadata().at(partial)?.len();
        if prefix > 0 {
            hasher.update_mmap_rayon(partial).at(partial)?;
        }
        let mut received = 0;
        for attempt in 0..=RESUMES {
            let offset = prefix + received;
            progress.set_position(offset);
            let req = pb::DownloadBlobRequest {
                digest: blob.to_string(),
                offset,
            };
            let result = async {
                let body = self.download_call(&req).await?;
                let mut sink = |piece| match piece {
                    Piece::Start(at) if at != prefix + received => Err(Error::Invalid(format!(
                        "registry sent offset {at} while {} was expected",
                        prefix + received
                    ))),
                    Piece::Start(_) => Ok(()),
                    Piece::Data(data) => {
                        file.write_all(&data).at(partial)?;
                        hasher.update(&data);
                        received += data.len() as u64;
                        progress.inc(data.len() as u64);
                        Ok(())
                    }
                };
                chunks::read(body, &mut sink).await
            }
            .await;
            match result {
                Ok(()) => break,
                Err(Error::Rpc(s)) if attempt < RESUMES && is_transient(s.code()) => {
                    tracing::warn!(blob = %blob, error = %s, "download interrupted; resuming");
                }
                Err(e) => return Err(e),
            }
        }
        // No fsync: the cache is a re-verifiable copy (`hub::verify_cached`), as cargo's is,
        // and pull speed would otherwise be the disk's sync rate, not the network's.
        drop(file);
        let actual = Digest::from_hash(hasher.finalize());
        if actual != blob {
            // Bad bytes are never kept: the next attempt starts clean.
            let _ = std::fs::remove_file(partial);
            return Err(Error::Integrity {
                what: format!("downloaded blob {}", partial.display()),
                expected: blob,
                actual,
            });
        }
        Ok(received)
    }

    /// Calls `DownloadBlob` over the connection without tonic's decoder (see
    /// [`chunks`]): the response body once the registry has answered with a stream, or its
    /// refusal as a status.
    async fn download_call(&self, req: &pb::DownloadBlobRequest) -> Result<tonic::body::Body> {
        use prost::Message;
        use tonic::codegen::Service;
        let msg = req.encode_to_vec();
        let mut frame = Vec::with_capacity(5 + msg.len());
        frame.push(0);
        frame.extend(u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend(msg);
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!(
                "/{}/DownloadBlob",
                delta_proto::registry_server::SERVICE_NAME
            ))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers");
        if let Some(v) = &self.auth.0 {
            request = request.header(http::header::AUTHORIZATION, v.as_bytes());
        }
        let request = request
            .body(tonic::body::Body::new(http_body_util::Full::new(
                Bytes::from(frame),
            )))
            .map_err(|e| Error::Invalid(format!("download request: {e}")))?;
        let mut channel = self.channel.clone();
        std::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .map_err(|e| Status::from_error(Box::new(e)))?;
        let response = channel
            .call(request)
            .await
            .map_err(|e| Status::from_error(Box::new(e)))?;
        // A refusal comes as headers only (a trailers-only response).
        if let Some(s) = Status::from_header_map(response.headers())
            && s.code() != Code::Ok
        {
            return Err(s.into());
        }
        let status = response.status();
        if status != http::StatusCode::OK {
            let code = match status.as_u16() {
                502..=504 => Code::Unavailable,
                _ => Code::Unknown,
            };
            return Err(Status::new(code, format!("registry answered HTTP {status}")).into());
        }
        Ok(response.into_body())
    }

    /// Registers a base from its tensor table with every tensor's digest (see
    /// [`crate::tensors::Model::entries`]): the registry recomputes the fingerprint from
    /// them. Returns whether the record was new.
    pub async fn add_base(&self, name: &str, entries: &[FingerprintEntry]) -> Result<bool> {
        let fingerprint = delta_proto::fingerprint::fingerprint(&mut entries.to_vec());
        let req = pb::AddBaseRequest {
            name: name.to_owned(),
            fingerprint: fingerprint.to_string(),
            tensors: entries.iter().cloned().map(Into::into).collect(),
        };
        Ok(self
            .client
            .clone()
            .add_base(req)
            .await?
            .into_inner()
            .created)
    }

    /// A base by name or fingerprint.
    pub async fn get_base(&self, name_or_fingerprint: &str) -> Result<BaseRecord> {
        let req = pb::GetBaseRequest {
            name_or_fingerprint: name_or_fingerprint.to_owned(),
        };
        let wire = self.client.clone().get_base(req).await?.into_inner();
        listed(vec![wire], "a base record")?
            .pop()
            .ok_or_else(|| Error::Invalid("the registry sent no base record".into()))
    }

    /// Every base.
    pub async fn list_bases(&self) -> Result<Vec<BaseRecord>> {
        let resp = self
            .client
            .clone()
            .list_bases(pb::ListBasesRequest {})
            .await?
            .into_inner();
        listed(resp.bases, "a base record")
    }

    /// Pushes a manifest. Returns `(version, digest, created)`.
    pub async fn push_manifest(
        &self,
        repository: &str,
        manifest: &Manifest,
        tags: &[String],
    ) -> Result<(u64, Digest, bool)> {
        let req = pb::PushManifestRequest {
            repository: repository.to_owned(),
            manifest: manifest.canonical_json(),
            tags: tags.to_vec(),
        };
        let resp = self.client.clone().push_manifest(req).await?.into_inner();
        let d = digest(&resp.digest)?;
        if d != manifest.digest() {
            return Err(Error::Integrity {
                what: "pushed manifest".into(),
                expected: manifest.digest(),
                actual: d,
            });
        }
        Ok((resp.version, d, resp.created))
    }

    /// Resolves a reference and checks the manifest bytes against their digest.
    pub async fn resolve(&self, reference: &str) -> Result<Resolved> {
        let resp = self
            .client
            .clone()
            .resolve(pb::ResolveRequest {
                reference: reference.to_owned(),
            })
            .await?
            .into_inner();
        let d = digest(&resp.digest)?;
        let actual = Digest::of(&resp.manifest);
        if actual != d {
            return Err(Error::Integrity {
                what: format!("manifest of {reference}"),
                expected: d,
                actual,
            });
        }
        let manifest = Manifest::from_json(&resp.manifest)?;
        Ok(Resolved {
            repository: resp.repository,
            version: resp.version,
            digest: d,
            manifest,
            tags: resp.tags,
            yanked: resp.yanked,
        })
    }

    /// Who the registry takes this connection's token for.
    pub async fn whoami(&self) -> Result<WhoAmI> {
        let r = self
            .client
            .clone()
            .who_am_i(pb::WhoAmIRequest {})
            .await?
            .into_inner();
        let unknown =
            |e: delta_proto::UnknownName| Error::Invalid(format!("the registry's WhoAmI: {e}"));
        Ok(WhoAmI {
            kind: r.kind.parse().map_err(unknown)?,
            token_id: r.token_id,
            namespace: r.namespace,
            scope: match r.scope.as_str() {
                "" => None,
                s => Some(s.parse().map_err(unknown)?),
            },
            expires_at: (r.expires_at != 0).then_some(r.expires_at),
        })
    }

    /// Repositories, optionally in one namespace.
    pub async fn list_repositories(&self, namespace: &str) -> Result<Vec<RepoSummary>> {
        let req = pb::ListRepositoriesRequest {
            namespace: namespace.to_owned(),
        };
        let wire = self.client.clone().list_repositories(req).await?;
        listed(wire.into_inner().repositories, "a repository")
    }

    /// Versions of a repository, newest first.
    pub async fn list_versions(&self, repository: &str) -> Result<Vec<VersionInfo>> {
        let req = pb::ListVersionsRequest {
            repository: repository.to_owned(),
        };
        let wire = self.client.clone().list_versions(req).await?;
        listed(wire.into_inner().versions, "a version")
    }

    /// Deltas matching filters (empty strings match everything).
    pub async fn search(
        &self,
        namespace: &str,
        base_fingerprint: Option<Digest>,
        method: &str,
        annotations: BTreeMap<String, String>,
    ) -> Result<Vec<DeltaSummary>> {
        let req = pb::SearchDeltasRequest {
            namespace: namespace.to_owned(),
            base_fingerprint: base_fingerprint.map(|d| d.to_string()).unwrap_or_default(),
            method: method.to_owned(),
            annotations: annotations.into_iter().collect(),
        };
        let wire = self.client.clone().search_deltas(req).await?;
        listed(wire.into_inner().deltas, "a delta")
    }

    /// Removes a tag. Returns whether it existed.
    pub async fn delete_tag(&self, repository: &str, tag: &str) -> Result<bool> {
        let req = pb::DeleteTagRequest {
            repository: repository.to_owned(),
            tag: tag.to_owned(),
        };
        Ok(self
            .client
            .clone()
            .delete_tag(req)
            .await?
            .into_inner()
            .deleted)
    }

    /// Yanks (or, with `undo`, restores) a version. Returns `(repository, version, tags
    /// that point at it now)`.
    pub async fn yank(&self, reference: &str, undo: bool) -> Result<(String, u64, Vec<String>)> {
        let resp = self
            .client
            .clone()
            .yank_version(pb::YankVersionRequest {
                reference: reference.to_owned(),
                undo,
            })
            .await?
            .into_inner();
        Ok((resp.repository, resp.version, resp.tags))
    }

    /// Deletes a version. Returns `(repository, version)`.
    pub async fn delete_version(&self, reference: &str) -> Result<(String, u64)> {
        let resp = self
            .client
            .clone()
            .delete_version(pb::DeleteVersionRequest {
                reference: reference.to_owned(),
            })
            .await?
            .into_inner();
        Ok((resp.repository, resp.version))
    }

    /// Runs garbage collection on the registry. Returns `(blobs, bytes, digests)`.
    pub async fn collect_garbage(
        &self,
        dry_run: bool,
        grace_seconds: u64,
    ) -> Result<(u64, u64, Vec<String>)> {
        let resp = self
            .client
            .clone()
            .collect_garbage(pb::CollectGarbageRequest {
                dry_run,
                grace_seconds,
            })
            .await?
            .into_inner();
        Ok((resp.blobs, resp.bytes, resp.digests))
    }

    /// Points `tag` at what `reference` resolves to; with `expected`, only if the tag now
    /// points at that version (0: absent). Returns `(version, previous)`.
    pub async fn set_tag(
        &self,
        reference: &str,
        tag: &str,
        expected: Option<u64>,
    ) -> Result<(u64, u64)> {
        let req = pb::SetTagRequest {
            reference: reference.to_owned(),
            tag: tag.to_owned(),
            expected_version: expected,
        };
        let resp = self.client.clone().set_tag(req).await?.into_inner();
        Ok((resp.version, resp.previous_version))
    }
}

fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::Internal
            | Code::DeadlineExceeded
    )
}

/// blake3 of a file, memory-mapped and hashed with every core.
pub fn hash_file(path: &Path) -> Result<Digest> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(path).at(path)?;
    Ok(Digest::from_hash(h.finalize()))
}

/// Reads `path` from `offset` to `size` as upload chunks, on a blocking thread.
fn file_chunks(
    path: std::path::PathBuf,
    upload_id: String,
    offset: u64,
    size: u64,
    progress: ProgressBar,
) -> impl Stream<Item = pb::UploadChunk> + Send + 'static {
    let (tx, rx) = mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read upload source");
                return;
            }
        };
        if let Err(e) = file.seek(SeekFrom::Start(offset)) {
            tracing::error!(path = %path.display(), error = %e, "cannot seek upload source");
            return;
        }
        let mut at = offset;
        let mut first = true;
        while at < size {
            let n = CHUNK_SIZE.min((size - at) as usize);
            let mut buf = vec![0u8; n];
            if let Err(e) = file.read_exact(&mut buf) {
                tracing::error!(path = %path.display(), error = %e, "upload source changed while uploading");
                return;
            }
            let id = if first {
                upload_id.clone()
            } else {
                String::new()
            };
            first = false;
            if tx
                .blocking_send(pb::UploadChunk {
                    upload_id: id,
                    offset: at,
                    data: Bytes::from(buf),
                })
                .is_err()
            {
                return;
            }
            progress.inc(n as u64);
            at += n as u64;
        }
    });
    ReceiverStream::new(rx)
}

/// Jobs: submission (`delta train`, `delta verify`) and the worker's side (lease, renew,
/// report, complete).
impl Remote {
    /// Uploads a local file as a blob unless the registry already has it (for datasets).
    /// Returns its digest.
    pub async fn upload_blob_file(&self, path: &Path, progress: &ProgressBar) -> Result<Digest> {
        let digest = hash_file(path)?;
        let size = std::fs::metadata(path).at(path)?.len();
        if !self.missing(&[digest]).await?.is_empty() {
            progress.set_length(size);
            self.upload_file(path, digest, size, progress).await?;
        }
        Ok(digest)
    }

    /// Queues a job.
    pub async fn submit_job(
        &self,
        kind: JobKind,
        spec: &serde_json::Value,
        repository: &str,
        tags: &[String],
        blobs: &[Digest],
    ) -> Result<Job> {
        let req = pb::SubmitJobRequest {
            kind: kind.to_string(),
            spec: spec.to_string(),
            repository: repository.to_owned(),
            tags: tags.to_vec(),
            blobs: blobs.iter().map(ToString::to_string).collect(),
        };
        job(self.client.clone().submit_job(req).await?.into_inner())
    }

    /// A job and its progress events after sequence number `after`.
    pub async fn get_job(&self, id: u64, after: u64) -> Result<(Job, Vec<JobEvent>)> {
        let resp = self
            .client
            .clone()
            .get_job(pb::GetJobRequest { id, after })
            .await?
            .into_inner();
        job_and_events(id, resp)
    }

    /// Follows a job: the job now and its events after `after`, then each change, until it
    /// ends (a stream the registry pushes; `None` from a registry without `WatchJob`).
    pub async fn watch_job(
        &self,
        id: u64,
        after: u64,
    ) -> Result<Option<impl Stream<Item = Result<(Job, Vec<JobEvent>)>> + use<>>> {
        let stream = match self
            .client
            .clone()
            .watch_job(pb::GetJobRequest { id, after })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::Unimplemented => return Ok(None),
            Err(s) => return Err(s.into()),
        };
        Ok(Some(futures::StreamExt::map(stream, move |item| {
            job_and_events(id, item?)
        })))
    }

    /// Leases a waiting job, if any: the job and the lease token.
    pub async fn lease_job(
        &self,
        worker: &str,
        kinds: &[JobKind],
        lease_seconds: u32,
    ) -> Result<Option<(Job, String)>> {
        self.lease_job_on(worker, kinds, &[], lease_seconds, 0)
            .await
    }

    /// [`Remote::lease_job`] for a worker holding `bases` (fingerprints; empty: any): jobs
    /// on other bases are left for workers that hold theirs. With `wait_seconds`, an idle
    /// registry holds the call until a job comes (long poll, at most 60 s).
    pub async fn lease_job_on(
        &self,
        worker: &str,
        kinds: &[JobKind],
        bases: &[Digest],
        lease_seconds: u32,
        wait_seconds: u32,
    ) -> Result<Option<(Job, String)>> {
        let resp = self
            .client
            .clone()
            .lease_job(pb::LeaseJobRequest {
                worker: worker.to_owned(),
                lease_seconds,
                kinds: kinds.iter().map(ToString::to_string).collect(),
                bases: bases.iter().map(ToString::to_string).collect(),
                wait_seconds,
            })
            .await?
            .into_inner();
        resp.job.map(|j| Ok((job(j)?, resp.lease))).transpose()
    }

    /// Extends a held lease.
    pub async fn renew_lease(&self, id: u64, lease: &str, lease_seconds: u32) -> Result<i64> {
        let req = pb::RenewLeaseRequest {
            id,
            lease: lease.to_owned(),
            lease_seconds,
        };
        Ok(self
            .client
            .clone()
            .renew_lease(req)
            .await?
            .into_inner()
            .expires)
    }

    /// Appends a progress event to a held job.
    pub async fn report_progress(&self, id: u64, lease: &str, body: &str) -> Result<()> {
        let req = pb::ReportProgressRequest {
            id,
            lease: lease.to_owned(),
            body: body.to_owned(),
        };
        self.client.clone().report_progress(req).await?;
        Ok(())
    }

    /// Completes a held job: failed (`error`), trained (`manifest`) or verified (`report`).
    pub async fn complete_job(
        &self,
        id: u64,
        lease: &str,
        error: Option<&str>,
        manifest: Option<&Manifest>,
        report: Option<&str>,
    ) -> Result<Job> {
        let req = pb::CompleteJobRequest {
            id,
            lease: lease.to_owned(),
            error: error.unwrap_or_default().to_owned(),
            manifest: manifest.map(Manifest::canonical_json).unwrap_or_default(),
            report: report.unwrap_or_default().to_owned(),
        };
        job(self.client.clone().complete_job(req).await?.into_inner())
    }

    /// Verification reports on a delta.
    pub async fn list_reports(&self, reference: &str) -> Result<Vec<Report>> {
        let req = pb::ListReportsRequest {
            reference: reference.to_owned(),
        };
        let wire = self.client.clone().list_reports(req).await?;
        listed(wire.into_inner().reports, "a report")
    }
}

/// A job from the wire; a kind or state this client does not know is the registry's
/// error to report, not a panic.
fn job(j: pb::JobInfo) -> Result<Job> {
    Job::try_from(j).map_err(|e| Error::Invalid(format!("the registry sent a job with {e}")))
}

/// Listed items from the wire as domain types; a malformed digest is the registry's
/// error to report.
fn listed<W, D: TryFrom<W, Error = delta_proto::catalog::BadListing>>(
    items: Vec<W>,
    what: &str,
) -> Result<Vec<D>> {
    items
        .into_iter()
        .map(|w| {
            D::try_from(w).map_err(|e| Error::Invalid(format!("the registry sent {what} with {e}")))
        })
        .collect()
}

/// A `GetJob`/`WatchJob` answer as domain types.
fn job_and_events(id: u64, resp: pb::GetJobResponse) -> Result<(Job, Vec<JobEvent>)> {
    let j = resp
        .job
        .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
    Ok((
        job(j)?,
        resp.events.into_iter().map(JobEvent::from).collect(),
    ))
}
