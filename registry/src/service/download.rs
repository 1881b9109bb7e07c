//! `DownloadBlob` written onto the wire by hand. tonic's encoder copies every message into
//! a buffer of its own, and for blob bytes that copy was an eighth of the registry's CPU
//! while serving (`perf`, 256 MiB pulls). [`Downloads`] sits in front of the generated
//! service, answers `DownloadBlob` itself and passes every other call through. The wire is
//! the same gRPC stream (the same `BlobChunk` messages, the same trailers; grpcio's Python
//! client reads it in `tests/python/grpc_client.py`): each message goes out as two HTTP/2
//! data frames, its few bytes of framing, then the blob's bytes as read from the store.
//! Who may read what is decided by [`super::blobs::blob_pieces`], as for the generated path.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use delta_proto as pb;
use futures::StreamExt;
use futures::future::BoxFuture;
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use prost::Message;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Request, Status};

use super::RegistryService;
use super::blobs::blob_pieces;

/// The largest `DownloadBlobRequest` accepted (a digest and an offset need under 100 bytes).
const MAX_REQUEST: usize = 4096;

/// The generated registry service `S`, with `DownloadBlob` answered by [`respond`].
#[derive(Clone)]
pub(crate) struct Downloads<S> {
    inner: S,
    service: RegistryService,
}

impl<S> Downloads<S> {
    pub(crate) fn new(inner: S, service: RegistryService) -> Self {
        Self { inner, service }
    }
}

impl<S: NamedService> NamedService for Downloads<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for Downloads<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path();
        let ours =
            path.strip_prefix('/').and_then(|p| p.strip_prefix(S::NAME)) == Some("/DownloadBlob");
        if !ours {
            return Box::pin(self.inner.call(req));
        }
        let service = self.service.clone();
        Box::pin(async move {
            Ok(respond(service, req)
                .await
                .unwrap_or_else(Status::into_http))
        })
    }
}

/// Reads the one request message, asks [`blob_pieces`] for the caller's bytes and streams
/// them; a refusal before the first byte is a trailers-only response, as tonic sends.
async fn respond(
    service: RegistryService,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, Status> {
    let (parts, body) = req.into_parts();
    let bytes = Limited::new(body, MAX_REQUEST)
        .collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("DownloadBlob request: {e}")))?
        .to_bytes();
    let message = match bytes.as_ref() {
        [0, len @ ..] if len.len() >= 4 => {
            let n = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let msg = &len[4..];
            if msg.len() != n {
                return Err(Status::invalid_argument(
                    "DownloadBlob request: its length prefix does not match its body",
                ));
            }
            pb::DownloadBlobRequest::decode(msg)
                .map_err(|e| Status::invalid_argument(format!("DownloadBlob request: {e}")))?
        }
        [1, ..] => {
            return Err(Status::unimplemented(
                "DownloadBlob request: compressed messages are not accepted",
            ));
        }
        _ => {
            return Err(Status::invalid_argument(
                "DownloadBlob request: expected one gRPC message",
            ));
        }
    };
    let request = Request::from_http(http::Request::from_parts(parts, message));
    let pieces = blob_pieces(&service, request).await?;
    // Each piece becomes its framing and its bytes; the end (clean or not) the trailers.
    let frames = futures::stream::unfold(Some(pieces), |pieces| async move {
        let mut pieces = pieces?;
        let (frames, next) = match pieces.next().await {
            Some(Ok((offset, data))) => (
                vec![
                    Frame::data(message_head(offset, data.len())),
                    Frame::data(data),
                ],
                Some(pieces),
            ),
            Some(Err(status)) => (vec![trailers(&status)], None),
            None => (vec![trailers(&Status::new(Code::Ok, ""))], None),
        };
        Some((
            futures::stream::iter(frames.into_iter().map(Ok::<_, Infallible>)),
            next,
        ))
    })
    .flatten();
    let mut response = http::Response::new(Body::new(StreamBody::new(frames)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// The trailers that end the stream with `status`.
fn trailers(status: &Status) -> Frame<Bytes> {
    let mut map = http::HeaderMap::new();
    // `add_header` fails only on a message a header cannot carry; the code alone then.
    if status.add_header(&mut map).is_err() {
        let _ = Status::new(status.code(), "").add_header(&mut map);
    }
    Frame::trailers(map)
}

/// Everything of a gRPC message holding `BlobChunk { offset, data }` but the data's bytes:
/// the 5-byte message prefix and the protobuf tags and lengths, as prost writes them
/// (proto3 leaves out a zero offset and empty data).
fn message_head(offset: u64, len: usize) -> Bytes {
    let mut fields = BytesMut::with_capacity(32);
    if offset != 0 {
        fields.put_u8(0x08); // field 1, varint
        prost::encoding::encode_varint(offset, &mut fields);
    }
    if len != 0 {
        fields.put_u8(0x12); // field 2, length-delimited
        prost::encoding::encode_varint(len as u64, &mut fields);
    }
    let total = fields.len() + len;
    let mut head = BytesMut::with_capacity(5 + fields.len());
    head.put_u8(0);
    head.put_u32(u32::try_from(total).unwrap_or(u32::MAX));
    head.put(fields);
    head.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_and_the_bytes_are_what_prost_writes() {
        for (offset, len) in [(0, 0), (0, 5), (7, 0), (1 << 20, 1 << 20), (u64::MAX, 300)] {
            let data = Bytes::from(vec![0xab; len]);
            let msg = pb::BlobChunk {
                offset,
                data: data.clone(),
            }
            .encode_to_vec();
            let mut want = vec![0];
            want.extend((msg.len() as u32).to_be_bytes());
            want.extend(msg);
            let mut got = message_head(offset, len).to_vec();
            got.extend_from_slice(&data);
            assert_eq!(got, want, "offset {offset}, {len} bytes");
        }
    }
}
