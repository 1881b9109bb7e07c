//! [`Service`]: a typed client of a worker's inference service (`delta-worker infer`),
//! the one client module besides `remote` that touches generated types.

use std::path::Path;

use delta_proto::inference as pb;
use delta_proto::inference::inference_client::InferenceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::Result;
use crate::jobs::Example;
use crate::remote::{Auth, NoDetails, bearer, connect_error, endpoint};

/// A connection to an inference service, sending the caller's registry token (the
/// service resolves deltas with it).
#[derive(Debug, Clone)]
pub struct Service {
    client: InferenceClient<InterceptedService<NoDetails<Channel>, Auth>>,
}

/// What to run inputs through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// Delta references, mounted in order (none: the bare base).
    pub deltas: Vec<String>,
    /// A base fingerprint or the service's folder name (empty: the deltas' base).
    pub base: String,
}

/// One prediction.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    /// Index of the most probable class.
    pub label_index: usize,
    /// Its name, when the head records labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Class probabilities.
    pub probabilities: Vec<f64>,
    /// Logits.
    pub logits: Vec<f32>,
}

/// A reference as the registry resolved it for the call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResolvedDelta {
    /// As asked.
    pub reference: String,
    /// `namespace/name`.
    pub repository: String,
    /// Manifest digest.
    pub digest: String,
    /// The version is yanked.
    pub yanked: bool,
}

/// Predictions of one call.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Predictions {
    /// One per input.
    pub predictions: Vec<Prediction>,
    /// The head's labels.
    pub labels: Vec<String>,
    /// What ran.
    pub deltas: Vec<ResolvedDelta>,
    /// Base fingerprint.
    pub base: String,
}

/// Embeddings of one call.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Embeddings {
    /// One per input.
    pub embeddings: Vec<Vec<f32>>,
    /// What ran.
    pub deltas: Vec<ResolvedDelta>,
    /// Base fingerprint.
    pub base: String,
}

fn resolved(d: Vec<pb::ResolvedDelta>) -> Vec<ResolvedDelta> {
    d.into_iter()
        .map(|d| ResolvedDelta {
            reference: d.reference,
            repository: d.repository,
            digest: d.digest,
            yanked: d.yanked,
        })
        .collect()
}

fn wire(target: &Target, inputs: &[Example]) -> (Option<pb::Target>, Vec<pb::Input>) {
    (
        Some(pb::Target {
            deltas: target.deltas.clone(),
            base: target.base.clone(),
        }),
        inputs
            .iter()
            .map(|e| pb::Input {
                text: e.text.clone(),
                text_pair: e.text_pair.clone(),
            })
            .collect(),
    )
}

impl Service {
    /// Connects to `url` (`http://host:port`, or `https://` trusting the web PKI and
    /// `ca_cert`), sending `token` with every call.
    pub async fn connect(url: &str, token: Option<&str>, ca_cert: Option<&Path>) -> Result<Self> {
        let channel = endpoint(url, ca_cert)?
            .connect()
            .await
            .map_err(|e| connect_error(url, e))?;
        Ok(Self {
            client: InferenceClient::with_interceptor(NoDetails(channel), Auth(bearer(token)?))
                .max_decoding_message_size(64 << 20),
        })
    }

    /// Class predictions for `inputs`.
    pub async fn predict(&self, target: &Target, inputs: &[Example]) -> Result<Predictions> {
        let (target, inputs) = wire(target, inputs);
        let r = self
            .client
            .clone()
            .predict(pb::PredictRequest { target, inputs })
            .await?
            .into_inner();
        Ok(Predictions {
            predictions: r
                .predictions
                .into_iter()
                .map(|p| Prediction {
                    label_index: p.label_index as usize,
                    label: (!p.label.is_empty()).then_some(p.label),
                    probabilities: p.probabilities,
                    logits: p.logits,
                })
                .collect(),
            labels: r.labels,
            deltas: resolved(r.deltas),
            base: r.base,
        })
    }

    /// Pooled embeddings for `inputs` (unit length when `normalize`).
    pub async fn embed(
        &self,
        target: &Target,
        inputs: &[Example],
        normalize: bool,
    ) -> Result<Embeddings> {
        let (target, inputs) = wire(target, inputs);
        let r = self
            .client
            .clone()
            .embed(pb::EmbedRequest {
                target,
                inputs,
                normalize,
            })
            .await?
            .into_inner();
        Ok(Embeddings {
            embeddings: r.embeddings.into_iter().map(|e| e.values).collect(),
            deltas: resolved(r.deltas),
            base: r.base,
        })
    }
}
