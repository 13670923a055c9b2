//! Loading a model to serve: reading its file, loading it in every
//! suitable runtime, checking each (a test vector, or cross-comparison)
//! and keeping the fastest correct one ([`Runtimes::select`]).
//!
//! Two kinds of model come here: a version installed from the fleet
//! ([`select_installed`], checked against its signed slot) and a local
//! model file served standalone ([`select_local`]). The update task, the
//! start-up path, `serve` and the probe child all load through this
//! module, so a version loads the same way wherever it is tried.

use std::path::{Path, PathBuf};

use edgefleet_shared::{ModelFormat, ModelSlot, TestVector};

use super::{Check, Engine, EngineError, Runtimes, Selection};
use crate::activation::Failure;
use crate::model_store::InstalledModel;

/// How models are matched to runtimes on this device.
#[derive(Debug, Clone)]
pub struct Loading {
    /// The runtimes this build and device offer.
    pub runtimes: Runtimes,
    /// Serve every model with this runtime (config `runtime.pin`).
    pub pin: Option<String>,
}

/// Loads an installed version on a blocking thread: see
/// [`select_installed`].
pub async fn load_installed(
    installed: &InstalledModel,
    loading: &Loading,
) -> Result<Selection, Failure> {
    let installed = installed.clone();
    let loading = loading.clone();
    tokio::task::spawn_blocking(move || select_installed(&installed, &loading))
        .await
        .map_err(|e| Failure::Load(format!("loader task failed: {e}")))?
}

/// Loads an installed version in every suitable runtime on the calling
/// thread, checks each (the slot's signed test vector, or
/// cross-comparison), keeps the fastest correct one, and checks it has
/// the inputs and outputs the slot declares. A wrong answer is a
/// [`Failure::TestVector`]; anything else that stops it a
/// [`Failure::Load`].
pub fn select_installed(
    installed: &InstalledModel,
    loading: &Loading,
) -> Result<Selection, Failure> {
    let (path, slot) = (&installed.path, &installed.slot);
    let bytes = std::fs::read(path)
        .map_err(|e| Failure::Load(format!("cannot read {}: {e}", path.display())))?;
    let check = match &slot.test_vector {
        Some(tv) => Check::TestVector(tv),
        None => Check::CrossCompare,
    };
    let selection = loading
        .runtimes
        .select(
            slot.format,
            &bytes,
            &slot.inputs,
            check,
            loading.pin.as_deref(),
        )
        .map_err(|e| match e {
            EngineError::Incorrect(_) => Failure::TestVector(e.to_string()),
            e => Failure::Load(e.to_string()),
        })?;
    check_declared_interface(selection.engine.as_ref(), slot).map_err(Failure::Load)?;
    Ok(selection)
}

/// Checks the engine against the inputs and outputs the desired state
/// declares.
fn check_declared_interface(engine: &dyn Engine, slot: &ModelSlot) -> Result<(), String> {
    for (kind, declared, actual) in [
        ("input", &slot.inputs, engine.inputs()),
        ("output", &slot.outputs, engine.outputs()),
    ] {
        for d in declared {
            let a = actual.iter().find(|s| s.name == d.name).ok_or_else(|| {
                let names: Vec<&str> = actual.iter().map(|s| s.name.as_str()).collect();
                format!(
                    "model has no {kind} {:?} declared in the desired state (it has {names:?})",
                    d.name
                )
            })?;
            if a.datatype.as_str() != d.datatype {
                return Err(format!(
                    "{kind} {:?} is {} in the model but {} in the desired state",
                    d.name, a.datatype, d.datatype
                ));
            }
        }
    }
    Ok(())
}

/// Why a local model file cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum LocalLoadError {
    #[error("{0}: unknown model format (use a .onnx or .tflite file)")]
    UnknownFormat(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read test vector {path}: {source}")]
    ReadTestVector {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a test vector ({{\"inputs\": [...], \"expected\": [...], \"tolerance\": x}}): {source}")]
    NotATestVector {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl LocalLoadError {
    /// Whether the model loaded but gave wrong answers (its test vector,
    /// or runtimes disagreeing), as opposed to not loading at all.
    pub fn is_incorrect(&self) -> bool {
        matches!(self, Self::Engine(EngineError::Incorrect(_)))
    }
}

/// The format of a local model file, from its extension.
pub fn local_format(path: &Path) -> Result<ModelFormat, LocalLoadError> {
    ModelFormat::from_path(path).ok_or_else(|| LocalLoadError::UnknownFormat(path.to_path_buf()))
}

/// Loads a local model file in every suitable runtime, checks each (its
/// test vector, or cross-comparison) and keeps the fastest correct one.
pub fn select_local(
    runtimes: &Runtimes,
    format: ModelFormat,
    path: &Path,
    test_vector: Option<&TestVector>,
    pin: Option<&str>,
) -> Result<Selection, LocalLoadError> {
    let bytes = std::fs::read(path).map_err(|source| LocalLoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let (check, hints) = match test_vector {
        Some(tv) => (Check::TestVector(tv), tv.input_specs()),
        None => (Check::CrossCompare, Vec::new()),
    };
    Ok(runtimes.select(format, &bytes, &hints, check, pin)?)
}

/// Reads a test vector file (`fleetctl model push --test-vector`'s JSON).
pub fn read_test_vector(path: &Path) -> Result<TestVector, LocalLoadError> {
    let bytes = std::fs::read(path).map_err(|source| LocalLoadError::ReadTestVector {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| LocalLoadError::NotATestVector {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digits model in the repository's `models/` folder.
    fn digits() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits/digits_fp32.onnx")
    }

    #[test]
    fn a_local_model_loads_and_a_bad_test_vector_file_is_named() {
        let path = digits();
        let format = local_format(&path).unwrap();
        let selection = select_local(&Runtimes::builtin(), format, &path, None, None).unwrap();
        assert!(!selection.engine.inputs().is_empty());

        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("tv.json");
        std::fs::write(&junk, b"{not json").unwrap();
        let err = read_test_vector(&junk).unwrap_err();
        assert!(
            matches!(&err, LocalLoadError::NotATestVector { path, .. } if path == &junk),
            "{err:?}"
        );
        assert!(err.to_string().contains("is not a test vector"), "{err}");
        let err = local_format(&dir.path().join("model.bin")).unwrap_err();
        assert!(err.to_string().contains("unknown model format"), "{err}");
    }
}
