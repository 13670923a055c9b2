//! Inference engines behind one trait.
//!
//! A model is loaded, optimised and planned once, at activation, by
//! [`load()`] (through [`load::select_installed`] or [`load::select_local`],
//! which try every suitable runtime and keep the fastest correct one);
//! requests then only call [`infer`]. Checks that do not
//! depend on the runtime (input names, datatypes, shapes, element counts)
//! live here in [`validate_inputs`] so every engine refuses bad input the
//! same way, before any runtime code sees it. Runtime panics are caught
//! here too where panics unwind (tests, and `cargo build --release`). The
//! shipped builds (`cross/build`, profile `agent`) abort on panic instead,
//! to save 2 MB: there a new model is first loaded in a child process
//! (`probe.rs`) and refused if that dies, and a runtime that fails on
//! input that passed these checks restarts the agent (systemd).

#[cfg(feature = "litert")]
pub mod litert;
pub mod load;
#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
pub mod runtimes;
pub mod select;
pub mod tract;

pub use select::{Check, Runtimes, Selection, Trial, TrialOutcome};

use std::panic::{catch_unwind, AssertUnwindSafe};

use edgefleet_shared::ModelFormat;

use crate::tensor::{DataType, Tensor};

/// The declared interface of one model input or output. `None` in a shape
/// is a dynamic dimension (any size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<Option<usize>>,
}

impl IoSpec {
    /// The shape in Open Inference Protocol form (`-1` for dynamic).
    pub fn oip_shape(&self) -> Vec<i64> {
        self.shape
            .iter()
            .map(|d| d.map_or(-1, |d| d as i64))
            .collect()
    }
}

/// Why a model could not be loaded or a request could not be served.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("model could not be loaded by {runtime}: {reason}")]
    Load {
        runtime: &'static str,
        reason: String,
    },
    #[error("no runtime in this build can load {0} models")]
    UnsupportedFormat(ModelFormat),
    #[error("unknown input {name:?}; the model's inputs are: {expected}")]
    UnknownInput { name: String, expected: String },
    #[error("input {0:?} is given more than once")]
    DuplicateInput(String),
    #[error("missing input {0:?}")]
    MissingInput(String),
    #[error("input {name:?} has datatype {got}, the model expects {expected}")]
    WrongDatatype {
        name: String,
        expected: DataType,
        got: DataType,
    },
    #[error("input {name:?} has shape {got:?}, the model expects {expected:?} (-1 = any size)")]
    WrongShape {
        name: String,
        expected: Vec<i64>,
        got: Vec<usize>,
    },
    #[error("input {name:?} has {got} elements but its shape {shape:?} needs {expected}")]
    ElementCount {
        name: String,
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("inference failed in {runtime}: {reason}")]
    Runtime {
        runtime: &'static str,
        reason: String,
    },
    /// Every runtime loaded the model, none produced the expected outputs.
    #[error("no runtime produced correct results: {0}")]
    Incorrect(String),
    #[error("{runtime} panicked ({reason}); the request was dropped and the agent keeps serving")]
    Panicked {
        runtime: &'static str,
        reason: String,
    },
}

impl EngineError {
    /// True when the caller sent something wrong (a 4xx), false when the
    /// model or runtime failed (a 5xx).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::UnknownInput { .. }
                | Self::DuplicateInput(_)
                | Self::MissingInput(_)
                | Self::WrongDatatype { .. }
                | Self::WrongShape { .. }
                | Self::ElementCount { .. }
        )
    }
}

/// A loaded, optimised, ready-to-run model.
pub trait Engine: Send + Sync {
    /// The runtime's name as reported in metadata and status (`tract-onnx`).
    fn runtime(&self) -> &'static str;
    fn inputs(&self) -> &[IoSpec];
    fn outputs(&self) -> &[IoSpec];
    /// Runs the model. `inputs` are already validated and ordered like
    /// [`Engine::inputs`].
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError>;
}

/// Loads `bytes` with the built-in runtimes, choosing by cross-check and
/// speed (see [`select`]).
pub fn load(format: ModelFormat, bytes: &[u8]) -> Result<Box<dyn Engine>, EngineError> {
    Runtimes::builtin()
        .select(format, bytes, &[], Check::CrossCompare, None)
        .map(|s| s.engine)
}

/// Validates and reorders `inputs`, then runs `engine`, converting a panic
/// inside the runtime into an error.
pub fn infer(engine: &dyn Engine, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
    let ordered = validate_inputs(engine.inputs(), inputs)?;
    guard(engine.runtime(), || engine.run(ordered))
}

pub(crate) fn guard<T>(
    runtime: &'static str,
    f: impl FnOnce() -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let reason = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(runtime, %reason, "runtime panicked; the operation was abandoned, the agent keeps running");
            Err(EngineError::Panicked { runtime, reason })
        }
    }
}

/// Checks every input against `specs` and returns them in spec order.
pub fn validate_inputs(specs: &[IoSpec], inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
    let mut slots: Vec<Option<Tensor>> = vec![None; specs.len()];
    for tensor in inputs {
        let Some(index) = specs.iter().position(|s| s.name == tensor.name) else {
            let expected = specs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(EngineError::UnknownInput {
                name: tensor.name,
                expected,
            });
        };
        let spec = &specs[index];
        if tensor.data.datatype() != spec.datatype {
            return Err(EngineError::WrongDatatype {
                name: tensor.name,
                expected: spec.datatype,
                got: tensor.data.datatype(),
            });
        }
        let shape_ok = tensor.shape.len() == spec.shape.len()
            && tensor
                .shape
                .iter()
                .zip(&spec.shape)
                .all(|(&got, want)| want.is_none_or(|w| w == got));
        if !shape_ok {
            return Err(EngineError::WrongShape {
                name: tensor.name,
                expected: spec.oip_shape(),
                got: tensor.shape,
            });
        }
        let expected = Tensor::element_count(&tensor.shape).unwrap_or(usize::MAX);
        if expected != tensor.data.len() {
            return Err(EngineError::ElementCount {
                name: tensor.name.clone(),
                shape: tensor.shape.clone(),
                expected,
                got: tensor.data.len(),
            });
        }
        if slots[index].is_some() {
            return Err(EngineError::DuplicateInput(tensor.name));
        }
        slots[index] = Some(tensor);
    }
    slots
        .into_iter()
        .zip(specs)
        .map(|(slot, spec)| slot.ok_or_else(|| EngineError::MissingInput(spec.name.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorData;

    fn specs() -> Vec<IoSpec> {
        vec![
            IoSpec {
                name: "a".into(),
                datatype: DataType::Fp32,
                shape: vec![None, Some(2)],
            },
            IoSpec {
                name: "b".into(),
                datatype: DataType::Int64,
                shape: vec![Some(1)],
            },
        ]
    }

    fn a(shape: Vec<usize>, n: usize) -> Tensor {
        Tensor {
            name: "a".into(),
            shape,
            data: TensorData::Fp32(vec![0.0; n]),
        }
    }

    fn b() -> Tensor {
        Tensor {
            name: "b".into(),
            shape: vec![1],
            data: TensorData::Int64(vec![1]),
        }
    }

    #[test]
    fn inputs_are_reordered_to_the_model_order() {
        let out = validate_inputs(&specs(), vec![b(), a(vec![3, 2], 6)]).unwrap();
        assert_eq!(out[0].name, "a");
        assert_eq!(out[1].name, "b");
    }

    #[test]
    fn every_kind_of_bad_input_is_named() {
        let s = specs();
        let err = validate_inputs(&s, vec![a(vec![1, 3], 3), b()]).unwrap_err();
        assert!(matches!(err, EngineError::WrongShape { .. }), "{err}");
        let err = validate_inputs(&s, vec![a(vec![2], 2), b()]).unwrap_err();
        assert!(matches!(err, EngineError::WrongShape { .. }), "{err}");
        let err = validate_inputs(&s, vec![a(vec![1, 2], 3), b()]).unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::ElementCount {
                    expected: 2,
                    got: 3,
                    ..
                }
            ),
            "{err}"
        );
        let err = validate_inputs(&s, vec![a(vec![1, 2], 2)]).unwrap_err();
        assert_eq!(err, EngineError::MissingInput("b".into()));
        let err = validate_inputs(&s, vec![a(vec![1, 2], 2), b(), b()]).unwrap_err();
        assert_eq!(err, EngineError::DuplicateInput("b".into()));
        let mut wrong = b();
        wrong.data = TensorData::Int32(vec![1]);
        let err = validate_inputs(&s, vec![a(vec![1, 2], 2), wrong]).unwrap_err();
        assert!(matches!(err, EngineError::WrongDatatype { .. }), "{err}");
        let mut unknown = b();
        unknown.name = "zzz".into();
        let err = validate_inputs(&s, vec![unknown]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown input \"zzz\"; the model's inputs are: a, b"
        );
        assert!(err.is_client_error());
    }

    #[test]
    fn a_panicking_runtime_becomes_an_error() {
        let err = guard::<()>("test-runtime", || panic!("boom")).unwrap_err();
        assert_eq!(
            err,
            EngineError::Panicked {
                runtime: "test-runtime",
                reason: "boom".into()
            }
        );
        assert!(!err.is_client_error());
    }
}
