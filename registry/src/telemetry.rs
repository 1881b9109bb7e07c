//! Request ids, RPC metrics and the Prometheus endpoint.
//!
//! [`RequestLayer`] wraps every gRPC call: it gives the call a request id (an incoming
//! `x-request-id` is kept, so a proxy's id carries through), runs the handler inside a
//! `rpc` tracing span carrying the method and id, returns the id in the `x-request-id`
//! response header (the CLI prints it on errors), and counts the call by method and gRPC
//! code with its latency. The code is read from the response head: handlers' errors are
//! trailers-only responses, so their code is there; an error raised mid-stream, after the
//! head was sent, counts under the code of the head (0).
//!
//! [`serve_metrics`] answers `GET /metrics` in the Prometheus text format on its own port.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::Instrument;

/// Latency histogram bucket bounds, seconds.
const BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    calls: Mutex<BTreeMap<(String, u32), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// Blob bytes received in uploads.
    pub bytes_in: AtomicU64,
    /// Blob bytes sent in downloads.
    pub bytes_out: AtomicU64,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

impl Metrics {
    fn record(&self, method: &str, code: u32, took: Duration) {
        if let Ok(mut calls) = self.calls.lock() {
            *calls.entry((method.to_owned(), code)).or_default() += 1;
        }
        if let Ok(mut lat) = self.latency.lock() {
            let h = lat.entry(method.to_owned()).or_insert_with(|| Histogram {
                counts: vec![0; BUCKETS.len()],
                ..Histogram::default()
            });
            let s = took.as_secs_f64();
            for (i, b) in BUCKETS.iter().enumerate() {
                if s <= *b {
                    h.counts[i] += 1;
                }
            }
            h.sum += s;
            h.count += 1;
        }
    }

    /// Calls counted for `method` with gRPC `code`.
    pub fn calls(&self, method: &str, code: u32) -> u64 {
        self.calls
            .lock()
            .map(|c| c.get(&(method.to_owned(), code)).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The Prometheus text exposition, with gauges read at scrape time.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        out.push_str("# HELP delta_rpc_requests_total gRPC calls by method and status code.\n");
        out.push_str("# TYPE delta_rpc_requests_total counter\n");
        if let Ok(calls) = self.calls.lock() {
            for ((m, c), n) in calls.iter() {
                out.push_str(&format!(
                    "delta_rpc_requests_total{{method=\"{m}\",code=\"{}\"}} {n}\n",
                    code_name(*c)
                ));
            }
        }
        out.push_str("# HELP delta_rpc_duration_seconds gRPC call latency to the response head.\n");
        out.push_str("# TYPE delta_rpc_duration_seconds histogram\n");
        if let Ok(lat) = self.latency.lock() {
            for (m, h) in lat.iter() {
                for (b, n) in BUCKETS.iter().zip(&h.counts) {
                    out.push_str(&format!(
                        "delta_rpc_duration_seconds_bucket{{method=\"{m}\",le=\"{b}\"}} {n}\n"
                    ));
                }
                out.push_str(&format!(
                    "delta_rpc_duration_seconds_bucket{{method=\"{m}\",le=\"+Inf\"}} {}\n",
                    h.count
                ));
                out.push_str(&format!(
                    "delta_rpc_duration_seconds_sum{{method=\"{m}\"}} {}\n",
                    h.sum
                ));
                out.push_str(&format!(
                    "delta_rpc_duration_seconds_count{{method=\"{m}\"}} {}\n",
                    h.count
                ));
            }
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            ));
        };
        counter(
            &mut out,
            "delta_blob_bytes_received_total",
            "Blob bytes received in uploads.",
            self.bytes_in.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "delta_blob_bytes_sent_total",
            "Blob bytes sent in downloads.",
            self.bytes_out.load(Ordering::Relaxed),
        );
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            ));
        };
        gauge(
            &mut out,
            "delta_blobs_stored",
            "Blobs stored.",
            gauges.blobs,
        );
        gauge(
            &mut out,
            "delta_blob_bytes_stored",
            "Bytes of stored blobs.",
            gauges.blob_bytes,
        );
        out.push_str("# HELP delta_jobs Jobs by state.\n# TYPE delta_jobs gauge\n");
        for (state, n) in &gauges.jobs {
            out.push_str(&format!("delta_jobs{{state=\"{state}\"}} {n}\n"));
        }
        gauge(
            &mut out,
            "delta_worker_leases",
            "Jobs leased by a worker whose lease has not expired.",
            gauges.leases,
        );
        out
    }
}

/// Values read from the stores at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Stored blobs.
    pub blobs: u64,
    /// Their bytes.
    pub blob_bytes: u64,
    /// Jobs by state.
    pub jobs: BTreeMap<String, u64>,
    /// Live leases.
    pub leases: u64,
}

fn code_name(c: u32) -> &'static str {
    match c {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "OTHER",
    }
}

/// The request-id and metrics layer (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestLayer;

impl<S> tower::Layer<S> for RequestLayer {
    type Service = RequestService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestService { inner }
    }
}

/// The service [`RequestLayer`] makes.
#[derive(Debug, Clone)]
pub struct RequestService<S> {
    inner: S,
}

/// Header carrying the request id.
pub const REQUEST_ID: &str = "x-request-id";

impl<S, B, RB> tower::Service<http::Request<B>> for RequestService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let id = req
            .headers()
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        if let Ok(v) = http::HeaderValue::from_str(&id) {
            req.headers_mut().insert(REQUEST_ID, v);
        }
        let span = tracing::info_span!("rpc", method = %method, request_id = %id);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let start = Instant::now();
            let mut resp = fut.instrument(span).await?;
            if let Ok(v) = http::HeaderValue::from_str(&id) {
                resp.headers_mut().insert(REQUEST_ID, v);
            }
            let mut code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            // A request over the message limit is refused by tonic before any handler
            // runs, as OUT_OF_RANGE: answer RESOURCE_EXHAUSTED naming the limit instead.
            if code == tonic::Code::OutOfRange as u32 {
                let message = grpc_message(resp.headers());
                if let Some(status) =
                    crate::error::message_limit_status(tonic::Code::OutOfRange, &message)
                {
                    let headers = resp.headers_mut();
                    headers.remove("grpc-message");
                    headers.remove("grpc-status");
                    if status.add_header(headers).is_ok() {
                        code = status.code() as u32;
                    }
                }
            }
            // Failed authentications and refusals, so an operator sees who knocks: the
            // request id ties the line to the caller's error; the message names the token
            // by id and scope, never by its secret. Logged here, not in the handler's
            // span, so the id is there whatever level the `rpc` span is filtered at.
            if code == tonic::Code::Unauthenticated as u32
                || code == tonic::Code::PermissionDenied as u32
            {
                let message = grpc_message(resp.headers());
                tracing::warn!(
                    method = %method,
                    request_id = %id,
                    code = %tonic::Code::from(code as i32),
                    %message,
                    "refused"
                );
            }
            metrics().record(&method, code, start.elapsed());
            Ok(resp)
        })
    }
}

/// The `grpc-message` of a trailers-only response, percent-decoded ("" when absent).
fn grpc_message(headers: &http::HeaderMap) -> String {
    headers
        .get("grpc-message")
        .map(|v| {
            percent_encoding::percent_decode(v.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default()
}

/// Serves `GET /metrics` on `listener` until the task is dropped. `gauges` is called per
/// scrape.
pub async fn serve_metrics<F, Fut>(listener: TcpListener, gauges: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Gauges> + Send,
{
    let gauges = Arc::new(gauges);
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let gauges = gauges.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded); the body, if any, is ignored.
            while n < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(k)) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", metrics().render(&gauges().await))
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_owned(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
