//! A `DownloadBlob` response read straight off the wire. tonic's streaming decoder copies
//! every received byte into a buffer of its own before decoding a message; for blob bytes
//! that copy was a seventh of a pull's client CPU (`perf`, 256 MiB pulls). This parser
//! walks the same gRPC messages (a 1-byte compression flag and a 4-byte big-endian length,
//! then a protobuf `BlobChunk`: field 1 `offset`, field 2 `data`) and hands each piece of
//! `data` over as a slice of the HTTP/2 frame it arrived in.
//!
//! [`read`] drives the parser over a response body and ends with the registry's status.
//! Only what a `BlobChunk` needs is accepted: no compression, an offset before the data
//! (as every protobuf encoder writes fields in order), one data field per message; unknown
//! fields are skipped as protobuf requires.

use bytes::{Buf, Bytes};
use tonic::codegen::Body as _;
use tonic::{Code, Status};

use crate::error::{Error, Result};

/// The largest message accepted, as tonic's decoding limit was (8 MiB).
const MAX_MESSAGE: usize = 8 << 20;

/// What a chunk's bytes mean to the caller, in order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// A message's data starts; its `offset` field (0 when absent, as proto3 omits it).
    Start(u64),
    /// The next bytes of that data (a message's data may span several frames).
    Data(Bytes),
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Expecting a message's 5-byte prefix.
    Prefix,
    /// Inside a message with `left` bytes to go, expecting a field's tag.
    Field {
        left: usize,
        offset: Option<u64>,
        data_seen: bool,
    },
    /// Inside the data field: `data` of its bytes to go, then `left` more of the message.
    Data { left: usize, data: usize },
    /// Skipping `skip` bytes of an unknown field, then `left` more of the message.
    Skip {
        left: usize,
        skip: usize,
        offset: Option<u64>,
        data_seen: bool,
    },
}

/// Parses a `DownloadBlob` body frame by frame (see the module docs).
#[derive(Debug)]
pub(crate) struct ChunkParser {
    state: State,
    /// The head of an item (prefix, tag, varint) cut by a frame boundary; at most 32 bytes.
    pending: Vec<u8>,
}

impl Default for ChunkParser {
    fn default() -> Self {
        Self {
            state: State::Prefix,
            pending: Vec::new(),
        }
    }
}

fn malformed(what: &str) -> Error {
    Error::Invalid(format!("registry sent a malformed blob chunk: {what}"))
}

/// A protobuf varint at the start of `b`: `(value, length)`, `None` if `b` ends first.
fn varint(b: &[u8]) -> Result<Option<(u64, usize)>> {
    let mut value = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if b.len() >= 10 {
        return Err(malformed("a varint longer than 10 bytes"));
    }
    Ok(None)
}

impl ChunkParser {
    /// Feeds one frame of the body; `sink` gets each piece in order.
    pub(crate) fn feed(
        &mut self,
        mut frame: Bytes,
        sink: &mut impl FnMut(Piece) -> Result<()>,
    ) -> Result<()> {
        while !frame.is_empty() || matches!(self.state, State::Field { left: 0, .. }) {
            match self.state {
                State::Data { left, data } => {
                    let piece = frame.split_to(data.min(frame.len()));
                    let data = data - piece.len();
                    sink(Piece::Data(piece))?;
                    self.state = if data == 0 {
                        State::Field {
                            left,
                            offset: None,
                            data_seen: true,
                        }
                    } else {
                        State::Data { left, data }
                    };
                }
                State::Skip {
                    left,
                    skip,
                    offset,
                    data_seen,
                } => {
                    let n = skip.min(frame.len());
                    frame.advance(n);
                    self.state = if skip == n {
                        State::Field {
                            left,
                            offset,
                            data_seen,
                        }
                    } else {
                        State::Skip {
                            left,
                            skip: skip - n,
                            offset,
                            data_seen,
                        }
                    };
                }
                State::Field { left: 0, .. } => self.state = State::Prefix,
                State::Prefix | State::Field { .. } => {
                    // A contiguous view of the item's head: what was pending plus the
                    // frame's first bytes (an item's head is at most 21 bytes).
                    let had = self.pending.len();
                    let take = frame.len().min(32 - had);
                    let mut head = [0u8; 32];
                    head[..had].copy_from_slice(&self.pending);
                    head[had..had + take].copy_from_slice(&frame[..take]);
                    match self.item(&head[..had + take], sink)? {
                        Some(used) => {
                            frame.advance(used - had);
                            self.pending.clear();
                        }
                        None => {
                            // The item is cut: keep its head for the next frame.
                            self.pending.extend_from_slice(&frame[..take]);
                            frame.advance(take);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Parses one item (a message prefix or a field's head) at the start of `b`: the bytes
    /// it used, or `None` if `b` ends before it does.
    fn item(
        &mut self,
        b: &[u8],
        sink: &mut impl FnMut(Piece) -> Result<()>,
    ) -> Result<Option<usize>> {
        let (left, offset, data_seen) = match self.state {
            State::Prefix => {
                if b.len() < 5 {
                    return Ok(None);
                }
                if b[0] != 0 {
                    return Err(malformed("a compressed message, which was not asked for"));
                }
                let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
                if len > MAX_MESSAGE {
                    return Err(malformed(&format!(
                        "a message of {len} bytes (at most {MAX_MESSAGE})"
                    )));
                }
                self.state = State::Field {
                    left: len,
                    offset: None,
                    data_seen: false,
                };
                return Ok(Some(5));
            }
            State::Field {
                left,
                offset,
                data_seen,
            } => (left, offset, data_seen),
            State::Data { .. } | State::Skip { .. } => return Ok(Some(0)),
        };
        let Some((tag, t)) = varint(b)? else {
            return Ok(None);
        };
        let (field, wire) = (tag >> 3, tag & 7);
        let after_tag = |n: usize| -> Result<usize> {
            left.checked_sub(n)
                .ok_or_else(|| malformed("a field runs past the end of its message"))
        };
        match wire {
            // varint
            0 => {
                let Some((value, v)) = varint(&b[t..])? else {
                    return Ok(None);
                };
                let left = after_tag(t + v)?;
                let offset = if field == 1 {
                    if data_seen {
                        return Err(malformed("the offset comes after the data"));
                    }
                    Some(value)
                } else {
                    offset
                };
                self.state = State::Field {
                    left,
                    offset,
                    data_seen,
                };
                Ok(Some(t + v))
            }
            // length-delimited
            2 => {
                let Some((len, v)) = varint(&b[t..])? else {
                    return Ok(None);
                };
                let rest = after_tag(t + v)?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l <= rest)
                    .ok_or_else(|| malformed("a field runs past the end of its message"))?;
                if field == 2 {
                    if data_seen {
                        return Err(malformed("two data fields in one message"));
                    }
                    sink(Piece::Start(offset.unwrap_or(0)))?;
                    self.state = if len == 0 {
                        State::Field {
                            left: rest,
                            offset: None,
                            data_seen: true,
                        }
                    } else {
                        State::Data {
                            left: rest - len,
                            data: len,
                        }
                    };
                } else {
                    self.state = if len == 0 {
                        State::Field {
                            left: rest,
                            offset,
                            data_seen,
                        }
                    } else {
                        State::Skip {
                            left: rest - len,
                            skip: len,
                            offset,
                            data_seen,
                        }
                    };
                }
                Ok(Some(t + v))
            }
            // fixed64, fixed32
            1 | 5 => {
                let skip = if wire == 1 { 8 } else { 4 };
                let left = after_tag(t + skip)?;
                self.state = State::Skip {
                    left,
                    skip,
                    offset,
                    data_seen,
                };
                Ok(Some(t))
            }
            _ => Err(malformed(&format!("field {field} has wire type {wire}"))),
        }
    }

    /// Checks that the body ended between messages.
    pub(crate) fn finish(&self) -> Result<()> {
        match (self.state, self.pending.is_empty()) {
            (State::Prefix | State::Field { left: 0, .. }, true) => Ok(()),
            _ => Err(malformed("the stream ended inside a message")),
        }
    }
}

/// Reads a `DownloadBlob` response body to its end: each piece to `sink`, then the
/// registry's status from the trailers (a stream cut before them is `UNAVAILABLE`, so the
/// caller resumes). The body comes through [`super::NoDetails`], so tonic's status parser
/// never sees details it would panic on.
pub(crate) async fn read(
    mut body: tonic::body::Body,
    sink: &mut impl FnMut(Piece) -> Result<()>,
) -> Result<()> {
    let mut parser = ChunkParser::default();
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        let Some(frame) = frame else {
            return Err(Status::unavailable("the blob stream ended early").into());
        };
        match frame?.into_data() {
            Ok(data) => parser.feed(data, sink)?,
            Err(frame) => {
                let trailers = frame.into_trailers().unwrap_or_default();
                return match Status::from_header_map(&trailers) {
                    Some(s) if s.code() != Code::Ok => Err(s.into()),
                    Some(_) => parser.finish(),
                    None => {
                        Err(Status::internal("the blob stream ended without a gRPC status").into())
                    }
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn frame(chunk: &delta_proto::BlobChunk) -> Vec<u8> {
        let msg = chunk.encode_to_vec();
        let mut out = vec![0];
        out.extend((msg.len() as u32).to_be_bytes());
        out.extend(msg);
        out
    }

    /// Feeds `body` cut at `cuts` and returns the pieces, merged per message.
    fn parse(body: &[u8], cuts: &[usize]) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut parser = ChunkParser::default();
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut sink = |p: Piece| {
            match p {
                Piece::Start(o) => out.push((o, Vec::new())),
                Piece::Data(b) => out
                    .last_mut()
                    .ok_or_else(|| malformed("data before start"))?
                    .1
                    .extend_from_slice(&b),
            }
            Ok(())
        };
        let mut at = 0;
        for &c in cuts.iter().chain([&body.len()]) {
            parser.feed(Bytes::copy_from_slice(&body[at..c]), &mut sink)?;
            at = c;
        }
        parser.finish()?;
        Ok(out)
    }

    #[test]
    fn every_cut_of_a_stream_gives_the_same_chunks() {
        let chunks = [
            delta_proto::BlobChunk {
                offset: 0,
                data: Bytes::from_static(b"hello, "),
            },
            delta_proto::BlobChunk {
                offset: 7,
                data: Bytes::from(vec![7u8; 300]),
            },
            delta_proto::BlobChunk {
                offset: 307,
                data: Bytes::new(),
            },
        ];
        let body: Vec<u8> = chunks.iter().flat_map(frame).collect();
        let want: Vec<(u64, Vec<u8>)> = vec![(0, b"hello, ".to_vec()), (7, vec![7u8; 300])];
        // proto3 leaves out an empty data field: the third message holds only its offset.
        for a in 0..body.len() {
            for b in [a, a + 1, a + 3, body.len()] {
                let cuts = [a, b.min(body.len())];
                assert_eq!(parse(&body, &cuts).unwrap(), want, "cut at {cuts:?}");
            }
        }
        // One byte per frame.
        let ones: Vec<usize> = (1..body.len()).collect();
        assert_eq!(parse(&body, &ones).unwrap(), want);
    }

    #[test]
    fn unknown_fields_are_skipped() {
        // field 3 varint, field 4 bytes, field 5 fixed32, field 6 fixed64 around a chunk.
        let mut msg = vec![0x18, 0x96, 0x01, 0x22, 2, b'x', b'y', 0x2d, 1, 2, 3, 4];
        msg.extend([0x31, 1, 2, 3, 4, 5, 6, 7, 8]);
        msg.extend(
            delta_proto::BlobChunk {
                offset: 5,
                data: Bytes::from_static(b"abc"),
            }
            .encode_to_vec(),
        );
        msg.extend([0x18, 1]);
        let mut body = vec![0];
        body.extend((msg.len() as u32).to_be_bytes());
        body.extend(&msg);
        for cut in 0..body.len() {
            assert_eq!(
                parse(&body, &[cut]).unwrap(),
                vec![(5, b"abc".to_vec())],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn malformed_streams_are_refused_with_the_reason() {
        let err = |body: &[u8]| parse(body, &[]).unwrap_err().to_string();
        let good = frame(&delta_proto::BlobChunk {
            offset: 3,
            data: Bytes::from_static(b"abcd"),
        });
        let mut compressed = good.clone();
        compressed[0] = 1;
        assert!(
            err(&compressed).contains("compressed"),
            "{}",
            err(&compressed)
        );
        assert!(err(&good[..good.len() - 1]).contains("ended inside a message"));
        assert!(err(&good[..3]).contains("ended inside a message"));
        assert!(err(&[0, 0x7f, 0, 0, 0]).contains("at most"));
        // The message says 3 bytes, its data field 4.
        let mut short = good.clone();
        short[4] = 3;
        assert!(err(&short).contains("past the end"), "{}", err(&short));
        // Data, then an offset.
        let late = [0, 0, 0, 0, 5, 0x12, 1, b'a', 0x08, 9];
        assert!(err(&late).contains("after the data"), "{}", err(&late));
        let twice = [0, 0, 0, 0, 6, 0x12, 1, b'a', 0x12, 1, b'b'];
        assert!(err(&twice).contains("two data fields"), "{}", err(&twice));
        let group = [0, 0, 0, 0, 1, 0x0b];
        assert!(err(&group).contains("wire type 3"), "{}", err(&group));
        let long = [
            0, 0, 0, 0, 11, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert!(err(&long).contains("longer than 10"), "{}", err(&long));
    }
}
