//! Helpers for tests that run the `delta-registry` binary: start it, connect, upload.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use delta_proto::registry_client::RegistryClient;
use delta_proto::{self as pb, Digest};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A registry process.
pub(crate) struct Registry {
    pub(crate) child: Child,
    pub(crate) url: String,
}

/// A failing test must not leave its registry running (it would hold the test's output
/// pipe open and the run would hang).
impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `delta-registry serve` on a free loopback port over `data_dir`.
pub(crate) fn start(data_dir: &Path) -> Registry {
    start_with(data_dir, &[], &[])
}

/// [`start`] with more flags and environment variables.
pub(crate) fn start_with(data_dir: &Path, args: &[String], env: &[(String, String)]) -> Registry {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_delta-registry"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "error")
        .envs(env.iter().map(|(k, v)| (k, v)));
    start_command(cmd)
}

/// Runs a prepared `serve` command (its own environment, wrapper or stderr) and waits
/// for the line that says where it listens.
pub(crate) fn start_command(mut cmd: Command) -> Registry {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    Registry { child, url }
}

/// Sends a bearer token (or none) on every call.
#[derive(Clone)]
pub(crate) struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A raw gRPC client of the registry.
pub(crate) type Client = RegistryClient<InterceptedService<Channel, Bearer>>;

pub(crate) async fn client(url: &str) -> Client {
    client_with(url, None).await
}

/// A client that sends `secret` as its bearer token.
pub(crate) async fn client_with(url: &str, secret: Option<&str>) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = Bearer(secret.map(|s| format!("Bearer {s}").parse().unwrap()));
    RegistryClient::with_interceptor(channel, bearer)
}

/// A safetensors file with LoRA A/B for a [4, 4] weight, rank 1.
pub(crate) fn lora_file() -> Vec<u8> {
    let header = r#"{"w.lora_A":{"dtype":"F32","shape":[1,4],"data_offsets":[0,16]},"w.lora_B":{"dtype":"F32","shape":[4,1],"data_offsets":[16,32]}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend((0..8u32).flat_map(|i| (i as f32 * 0.25).to_le_bytes()));
    out
}

pub(crate) async fn upload(c: &mut Client, data: &[u8], upto: usize) -> pb::UploadBlobResponse {
    let d = Digest::of(data);
    let start = c
        .start_upload(pb::StartUploadRequest {
            digest: d.to_string(),
            size: data.len() as u64,
        })
        .await
        .unwrap()
        .into_inner();
    if start.present {
        return pb::UploadBlobResponse {
            committed: true,
            ..Default::default()
        };
    }
    let data = Bytes::copy_from_slice(data);
    let chunks: Vec<pb::UploadChunk> = (0..upto)
        .step_by(delta_proto::CHUNK_SIZE)
        .map(|off| pb::UploadChunk {
            upload_id: start.upload_id.clone(),
            offset: off as u64,
            data: data.slice(off..(off + delta_proto::CHUNK_SIZE).min(upto)),
        })
        .collect();
    c.upload_blob(futures::stream::iter(chunks))
        .await
        .unwrap()
        .into_inner()
}

/// Registers a base with one `[4, 4]` weight and uploads a rank-1 LoRA file for it.
/// Returns the base fingerprint and the file.
pub(crate) async fn base_and_lora_blob(c: &mut Client) -> (Digest, Vec<u8>) {
    // The record proves its table: the fingerprint is recomputed from the digest.
    let entry = delta_proto::fingerprint::FingerprintEntry {
        info: delta_proto::manifest::TensorInfo {
            name: "w.weight".into(),
            dtype: "F32".into(),
            shape: vec![4, 4],
        },
        digest: Digest::of(b"the base weight's bytes"),
    };
    let fp = delta_proto::fingerprint::fingerprint(&mut [entry.clone()]);
    c.add_base(pb::AddBaseRequest {
        name: "b".into(),
        fingerprint: fp.to_string(),
        tensors: vec![entry.into()],
    })
    .await
    .unwrap();
    let file = lora_file();
    assert!(upload(c, &file, file.len()).await.committed);
    (fp, file)
}

/// The secret a `delta-registry token create` run printed (its last line), checking the
/// command succeeded; `what` names it in the failure.
pub(crate) fn token_secret(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_else(|| panic!("{what} printed nothing"))
        .trim()
        .to_owned()
}

/// Runs `delta-registry token create ARGS --data-dir DATA` and returns the secret.
pub(crate) fn create_token(data: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_delta-registry"))
        .args(["token", "create"])
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    token_secret(&out, "token create")
}

/// The request id a refusal carries back.
pub(crate) fn request_id(status: &tonic::Status) -> String {
    status
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no request id on {status:?}"))
        .to_owned()
}
