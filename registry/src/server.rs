//! [`Server`]: the registry opened (database migrated, stores reachable) and then served,
//! with health and reflection, on a listener the caller bound; [`run`] does both.

use std::future::Future;
use std::time::Duration;

use delta_proto::registry_server::RegistryServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server as GrpcServer, ServerTlsConfig};

use crate::config::RegistryConfig;
use crate::error::Result;
use crate::service::RegistryService;

/// How long in-flight calls may take to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

/// Opens the stores and serves until `shutdown` resolves, then drains in-flight calls.
/// The library never binds a socket: the caller passes a bound `listener`, so tests can
/// bind `127.0.0.1:0` without a race.
pub async fn run(
    config: RegistryConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    Server::open(config).await?.serve(listener, shutdown).await
}

/// A registry whose database is migrated and whose stores are open, ready to serve. The
/// binary opens it *before* it binds and announces its address, so no call (and no admin
/// command racing the first start) ever meets a half-migrated database.
#[derive(Debug)]
pub struct Server {
    config: RegistryConfig,
    service: RegistryService,
    metrics: Option<TcpListener>,
}

impl Server {
    /// Opens the metadata database (migrating it, under a lock other processes respect)
    /// and the blob store.
    pub async fn open(config: RegistryConfig) -> Result<Self> {
        let service = RegistryService::open(&config).await?;
        Ok(Self {
            config,
            service,
            metrics: None,
        })
    }

    /// Serves `/metrics` on a listener the caller bound (as the main listener is), instead
    /// of binding `metrics_addr`: no free-port race.
    pub fn with_metrics_listener(mut self, listener: TcpListener) -> Self {
        self.metrics = Some(listener);
        self
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        serve(self.config, self.service, listener, self.metrics, shutdown).await
    }
}

async fn serve(
    config: RegistryConfig,
    service: RegistryService,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener.local_addr()?;
    if service.is_open().await? {
        tracing::warn!(
            "NO API TOKENS EXIST: this registry is OPEN; anyone who can reach {addr} can read and write everything. \
             Create a token with `delta-registry token create` to require tokens for writes and private reads."
        );
    }

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RegistryServer<RegistryService>>()
        .await;
    let (reflection, reflection_alpha) = reflection()?;
    let janitor = spawn_janitor(service.clone());
    let metrics_listener = match (metrics_listener, config.metrics_addr) {
        (Some(l), _) => Some(l),
        (None, Some(a)) => Some(TcpListener::bind(a).await?),
        (None, None) => None,
    };
    let metrics = metrics_listener
        .map(|l| spawn_metrics(l, service.clone()))
        .transpose()?;
    let registry = RegistryServer::new(service.clone())
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let registry = crate::service::Downloads::new(registry, service);
    tracing::info!(%addr, data_dir = %config.data_dir.display(), store = config.store_url.as_deref().unwrap_or("local"), "registry listening");
    // The shutdown signal stops accepting calls; in-flight ones get DRAIN to finish, so a
    // client that never closes its connection cannot hold the process forever.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut drain_rx = stop_rx.clone();
    let mut serve_rx = stop_rx;
    let serve = builder(&config)?
        .layer(crate::telemetry::RequestLayer)
        .initial_stream_window_size(Some(delta_proto::HTTP2_STREAM_WINDOW))
        .initial_connection_window_size(Some(delta_proto::HTTP2_CONNECTION_WINDOW))
        .max_frame_size(Some(delta_proto::HTTP2_MAX_FRAME))
        .tcp_nodelay(true)
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(registry)
        // `Server::tcp_nodelay` only applies to sockets tonic binds itself; for a listener the
        // caller bound, the incoming stream sets it (without it every reply waits ~40 ms for
        // Nagle and delayed ACKs).
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = serve_rx.wait_for(|stop| *stop).await;
            },
        );
    let drained = async move {
        let _ = drain_rx.wait_for(|stop| *stop).await;
        tokio::time::sleep(DRAIN).await;
    };
    let result = tokio::select! {
        r = serve => r,
        () = drained => {
            tracing::warn!("connections still open {DRAIN:?} after shutdown; closing them");
            Ok(())
        }
    };
    janitor.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    tracing::info!("registry stopped");
    Ok(result?)
}

/// The reflection services, both versions: grpcurl speaks v1, grpcio's Python tooling
/// v1alpha.
fn reflection() -> Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(delta_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let err = |e: tonic_reflection::server::Error| {
        crate::Error::InvalidArgument(format!("reflection: {e}"))
    };
    Ok((
        builder().build_v1().map_err(err)?,
        builder().build_v1alpha().map_err(err)?,
    ))
}

/// Every minute, expires idle uploads; at start-up and hourly, removes the staging
/// objects other replicas (or this one, before a crash) completed but never published.
fn spawn_janitor(service: RegistryService) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        let mut minutes = 0u64;
        loop {
            tick.tick().await;
            let n = service.expire_uploads().await;
            if n > 0 {
                tracing::info!(expired = n, "expired idle uploads");
            }
            if minutes.is_multiple_of(60) {
                service.cleanup_staging().await;
            }
            minutes += 1;
        }
    })
}

/// Serves `/metrics` on `listener`, with the registry's gauges read at each scrape.
fn spawn_metrics(
    listener: TcpListener,
    service: RegistryService,
) -> Result<tokio::task::JoinHandle<()>> {
    tracing::info!(addr = %listener.local_addr()?, "metrics on /metrics");
    Ok(tokio::spawn(crate::telemetry::serve_metrics(
        listener,
        move || {
            let service = service.clone();
            async move { service.gauges().await.unwrap_or_default() }
        },
    )))
}

/// The gRPC server builder, with TLS when the config names a certificate and key.
fn builder(config: &RegistryConfig) -> Result<GrpcServer> {
    let builder = GrpcServer::builder();
    let Some(tls) = &config.tls else {
        return Ok(builder);
    };
    let read = |p: &std::path::Path| {
        std::fs::read(p)
            .map_err(|e| crate::Error::InvalidArgument(format!("cannot read {}: {e}", p.display())))
    };
    let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
    builder
        .tls_config(ServerTlsConfig::new().identity(identity))
        .map_err(|e| crate::Error::InvalidArgument(format!("TLS certificate or key: {e}")))
}
