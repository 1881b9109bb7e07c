//! The delta worker: trains, verifies and runs deltas with candle, on CPU or CUDA.
//!
//! # Layout
//! - `bert`: the BERT-family encoder, written against tensor names with injection points.
//! - `fused`: GELU, layer norm, attention softmax and frozen linear layers as fused CPU ops
//!   with a backward pass.
//! - `mounts`: deltas mounted on a frozen base (what the injection points consult).
//! - `mixed`: one forward pass over rows that each carry their own delta.
//! - `methods`: delta methods as trainable tensors named like the native delta format.
//! - `train`: AdamW, schedule, accumulation, evaluation, best checkpoint.
//! - `data`: JSONL examples, tokenisation, batches, the synthetic sentiment task.
//! - `run`: whole runs (train a delta into a folder, load deltas, predict, verify).
//! - `infer`: the central delta service (many callers' deltas in mixed batches, gRPC).
//! - `serve`: the job loop against a registry (lease, renew, report, complete).
//! - `tiny`: tiny random bases for tests.
//! - `rng`: the seeded generator; `alloc`: glibc allocator settings for training.

pub mod alloc;
pub mod bert;
pub mod data;
pub mod fused;
pub mod infer;
pub mod methods;
pub mod mixed;
pub mod mounts;
pub mod rng;
pub mod run;
pub mod serve;
pub mod tiny;
pub mod train;
