//! Model-quality benchmarks: the serving features that change how the
//! agent answers under load, each measured through the real local API.
//!
//! Run: `cargo bench -p edgefleet-agent --features onnxruntime --bench
//! quality --locked` with `ORT_DYLIB_PATH` and `EDGEFLEET_TEST_MODELS` set.

#![allow(clippy::unwrap_used)] // a benchmark: a failed unwrap ends the run

#[path = "quality/batching.rs"]
mod batching;
#[allow(dead_code)]
mod common;
#[path = "quality/shadow.rs"]
mod shadow;

fn main() {
    batching::run();
    shadow::run();
}
