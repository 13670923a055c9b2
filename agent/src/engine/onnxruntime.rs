//! ONNX models on ONNX Runtime, loaded from `libonnxruntime.so` at run time
//! (the native build, `--features onnxruntime`). All `ort` calls live here.
//!
//! The same library exists for x86_64, aarch64 and, with the CUDA and
//! TensorRT execution providers, for Jetson; the `onnxruntime` wheel on
//! PyPI ships one the tests use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use edgefleet_shared::ModelFormat;
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};

use super::select::RuntimeEntry;
use super::{Engine, EngineError, IoSpec};
use crate::tensor::{DataType, Tensor, TensorData};

pub const ONNXRUNTIME: &str = "onnxruntime";

fn load_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Load {
        runtime: ONNXRUNTIME,
        reason: e.to_string(),
    }
}

fn run_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Runtime {
        runtime: ONNXRUNTIME,
        reason: e.to_string(),
    }
}

/// Loads the library once per process and returns the runtime entry, or
/// why ONNX Runtime is not available.
pub fn entry(library: Option<&Path>) -> Result<RuntimeEntry, String> {
    static ENV: OnceLock<Result<Arc<Environment>, String>> = OnceLock::new();
    let path: PathBuf = library
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"));
    let env = ENV
        .get_or_init(|| {
            let builder = ort::init_from(&path)
                .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
            builder
                .with_name("edgefleet")
                .build()
                .map(Arc::new)
                .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", path.display()))
        })
        .clone()?;
    tracing::info!(library = %path.display(), "ONNX Runtime available");
    Ok(RuntimeEntry::new(
        ONNXRUNTIME,
        ModelFormat::Onnx,
        move |bytes, _| OnnxRuntime::load(&env, bytes).map(|e| Box::new(e) as Box<dyn Engine>),
    ))
}

fn to_datatype(t: TensorElementType) -> Option<DataType> {
    Some(match t {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        _ => return None,
    })
}

fn io_spec(name: &str, dtype: &ValueType) -> Result<IoSpec, EngineError> {
    let ValueType::Tensor { ty, shape, .. } = dtype else {
        return Err(load_error(format!(
            "{name:?} is not a tensor ({dtype:?}); only tensor inputs and outputs are supported"
        )));
    };
    let datatype = to_datatype(*ty).ok_or_else(|| {
        load_error(format!(
            "{name:?} has element type {ty:?}, which the local API cannot carry"
        ))
    })?;
    Ok(IoSpec {
        name: name.to_string(),
        datatype,
        shape: shape.iter().map(|&d| usize::try_from(d).ok()).collect(),
    })
}

/// A loaded ONNX Runtime session. `ort` sessions run through `&mut`, so
/// requests to one model are serialised; the model runs single-threaded.
pub struct OnnxRuntime {
    session: Mutex<Session>,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
}

impl OnnxRuntime {
    pub fn load(env: &Environment, bytes: &[u8]) -> Result<Self, EngineError> {
        let session = Session::builder(env)
            .map_err(load_error)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(load_error)?
            .with_intra_threads(1)
            .map_err(load_error)?
            .with_inter_threads(1)
            .map_err(load_error)?
            // Errors come back as values and are reported by the agent;
            // ONNX Runtime's own stderr logging would only duplicate them.
            .with_log_level(ort::logging::LogLevel::Fatal)
            .map_err(load_error)?
            .commit_from_memory(bytes)
            .map_err(load_error)?;
        let inputs = session
            .inputs()
            .iter()
            .map(|o| io_spec(o.name(), o.dtype()))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = session
            .outputs()
            .iter()
            .map(|o| io_spec(o.name(), o.dtype()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            session: Mutex::new(session),
            inputs,
            outputs,
        })
    }
}

fn to_ort(t: Tensor) -> Result<(String, DynValue), EngineError> {
    let shape = t.shape.clone();
    macro_rules! make {
        ($($variant:ident),*) => {
            match t.data {
                $(TensorData::$variant(v) => OrtTensor::from_array((shape, v)).map(|x| x.into_dyn()),)*
            }
        };
    }
    let value =
        make!(Bool, Uint8, Uint16, Uint32, Uint64, Int8, Int16, Int32, Int64, Fp16, Fp32, Fp64)
            .map_err(|e| run_error(format!("input {:?}: {e}", t.name)))?;
    Ok((t.name, value))
}

fn from_ort(name: &str, value: &DynValue) -> Result<Tensor, EngineError> {
    let ty = value
        .dtype()
        .tensor_type()
        .and_then(to_datatype)
        .ok_or_else(|| run_error(format!("output {name:?} is not a supported tensor")))?;
    macro_rules! read {
        ($($variant:ident, $t:ty);*) => {
            match ty {
                $(DataType::$variant => {
                    let (shape, data) = value.try_extract_tensor::<$t>().map_err(run_error)?;
                    (shape.iter().map(|&d| d as usize).collect(), TensorData::$variant(data.to_vec()))
                })*
            }
        };
    }
    let (shape, data) = read!(Bool, bool; Uint8, u8; Uint16, u16; Uint32, u32; Uint64, u64; Int8, i8; Int16, i16;
        Int32, i32; Int64, i64; Fp16, half::f16; Fp32, f32; Fp64, f64);
    Ok(Tensor {
        name: name.to_string(),
        shape,
        data,
    })
}

impl Engine for OnnxRuntime {
    fn runtime(&self) -> &'static str {
        ONNXRUNTIME
    }

    fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        let values = inputs
            .into_iter()
            .map(to_ort)
            .collect::<Result<Vec<_>, _>>()?;
        let mut session = self
            .session
            .lock()
            .map_err(|_| run_error("session lock poisoned"))?;
        let outputs = session.run(values).map_err(run_error)?;
        self.outputs
            .iter()
            .map(|spec| {
                let value = outputs
                    .get(&spec.name)
                    .ok_or_else(|| run_error(format!("output {:?} missing", spec.name)))?;
                from_ort(&spec.name, value)
            })
            .collect()
    }
}
