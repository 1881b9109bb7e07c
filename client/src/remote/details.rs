//! [`NoDetails`]: a connection whose answers never carry `grpc-status-details-bin`.
//!
//! tonic's generated clients (and the hand-read `DownloadBlob`, `chunks::read`) read a
//! status from the response headers or trailers with `Status::from_header_map`, which
//! panics when that header's value is not base64. A broken or hostile server (or a proxy
//! in front of one) could send such a value and crash `delta` or the worker. Nothing here
//! reads the details (the code and message say everything the callers use), so the header
//! is dropped before tonic sees it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tonic::body::Body as TonicBody;
use tonic::codegen::{Service, http};

/// The header tonic's parser panics on.
const DETAILS: &str = "grpc-status-details-bin";

/// `S` (a [`tonic::transport::Channel`]) with [`DETAILS`] removed from every response's
/// headers and trailers.
#[derive(Debug, Clone)]
pub(crate) struct NoDetails<S>(pub(crate) S);

impl<S> Service<http::Request<TonicBody>> for NoDetails<S>
where
    S: Service<http::Request<TonicBody>, Response = http::Response<TonicBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<TonicBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<TonicBody>) -> Self::Future {
        let answer = self.0.call(req);
        Box::pin(async move {
            let mut response = answer.await?;
            response.headers_mut().remove(DETAILS);
            Ok(response.map(|body| TonicBody::new(Trailers(body))))
        })
    }
}

/// A response body with [`DETAILS`] removed from its trailers.
struct Trailers(TonicBody);

impl Body for Trailers {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = Pin::new(&mut self.get_mut().0).poll_frame(cx);
        frame.map_ok(|frame| match frame.into_trailers() {
            Ok(mut trailers) => {
                trailers.remove(DETAILS);
                Frame::trailers(trailers)
            }
            Err(frame) => frame,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}
