//! The delta hub worker: trains and verifies deltas with candle (issue 4).
//!
//! Not built yet. It will depend on `delta-client` for pulling, applying and pushing, and
//! is the only crate that links `candle-*`.
//!
//! # Layout
//! - (empty)
