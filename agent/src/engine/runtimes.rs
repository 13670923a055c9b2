//! Which runtimes this agent offers, found once at start-up.
//!
//! The pure-Rust tract runtimes are always there. The native build
//! (`--features onnxruntime,litert`) also offers ONNX Runtime and LiteRT,
//! each loaded from a shared library at run time; when a library is
//! missing its runtime is simply not offered, and that is logged once.

use std::path::{Path, PathBuf};

use super::select::Runtimes;
use crate::config::RuntimeConfig;

/// Where a runtime's shared library is loaded from, in this order: the
/// configured path, the environment variable `env`, `file_name` in the
/// agent package's library directory
/// (`<executable's directory>/../lib/edgefleet-agent/`) when it is there,
/// then `file_name` for the loader's search path. The native package ships
/// the libraries it was tested with in that directory, so they are found
/// without configuration and without touching the system's own copies.
pub fn library_path(configured: Option<&Path>, env: &str, file_name: &str) -> PathBuf {
    configured
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(env).map(PathBuf::from))
        .or_else(|| packaged_library(file_name))
        .unwrap_or_else(|| PathBuf::from(file_name))
}

/// Set by the agent's supervisor for the agent it runs: the packaged
/// executable, beside whose package directory the native libraries are.
pub const ENV_FACTORY_EXE: &str = "EDGEFLEET_FACTORY_EXE";

/// The library beside the packaged executable: this one's, or, for an
/// agent release running from a slot in the data dir, the one its
/// supervisor runs from.
fn packaged_library(file_name: &str) -> Option<PathBuf> {
    let exes = [
        std::env::current_exe().ok(),
        std::env::var_os(ENV_FACTORY_EXE).map(PathBuf::from),
    ];
    exes.into_iter().flatten().find_map(|exe| {
        let path = exe
            .parent()?
            .parent()?
            .join("lib/edgefleet-agent")
            .join(file_name);
        path.is_file().then_some(path)
    })
}

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
    #[cfg(feature = "litert")]
    match super::litert::entry(config.litert_library.as_deref()) {
        Ok(entry) => runtimes.prepend(entry),
        Err(reason) => {
            tracing::warn!(%reason, "LiteRT not available; serving TFLite models without it")
        }
    }
    #[cfg(not(feature = "litert"))]
    if config.litert_library.is_some() {
        tracing::warn!("runtime.litert_library is set but this is the static build (no LiteRT support); ignoring it");
    }
    runtimes
}
