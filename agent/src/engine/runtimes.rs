//! Which runtimes this agent offers, found once at start-up.
//!
//! The pure-Rust tract runtimes are always there. The native build
//! (`--features onnxruntime,tflite`) also offers ONNX Runtime and the
//! TensorFlow Lite C library, each loaded from a shared library at run
//! time; when a library is missing its runtime is simply not offered, and
//! that is logged once.

use super::select::Runtimes;
use crate::config::RuntimeConfig;

/// The runtimes available with `config`.
pub fn detect(config: &RuntimeConfig) -> Runtimes {
    #[allow(unused_mut)]
    let mut runtimes = Runtimes::builtin();
    #[cfg(feature = "onnxruntime")]
    match super::onnxruntime::entries(
        config.onnxruntime_library.as_deref(),
        &config.onnxruntime_providers,
    ) {
        Ok(entries) => entries.into_iter().rev().for_each(|e| runtimes.prepend(e)),
        Err(reason) => {
            tracing::warn!(%reason, "ONNX Runtime not available; serving ONNX models with tract only")
        }
    }
    #[cfg(not(feature = "onnxruntime"))]
    if config.onnxruntime_library.is_some() {
        tracing::warn!("runtime.onnxruntime_library is set but this is the static build (no ONNX Runtime support); ignoring it");
    }
    #[cfg(not(feature = "onnxruntime"))]
    if !config.onnxruntime_providers.is_empty() {
        tracing::warn!("runtime.onnxruntime_providers is set but this is the static build (no ONNX Runtime support); ignoring it");
    }
    #[cfg(feature = "tflite")]
    match super::tflite::entry(config.tflite_library.as_deref()) {
        Ok(entry) => runtimes.prepend(entry),
        Err(reason) => {
            tracing::warn!(%reason, "TFLite C runtime not available; serving TFLite models with tract only")
        }
    }
    #[cfg(not(feature = "tflite"))]
    if config.tflite_library.is_some() {
        tracing::warn!("runtime.tflite_library is set but this is the static build (no TFLite C runtime); ignoring it");
    }
    runtimes
}
