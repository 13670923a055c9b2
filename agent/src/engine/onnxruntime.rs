//! ONNX models on ONNX Runtime, loaded from `libonnxruntime.so` at run time
//! (the native build, `--features onnxruntime`). All `ort` calls live here.
//!
//! The same library exists for x86_64, aarch64 and, with the CUDA and
//! TensorRT execution providers, for Jetson; the `onnxruntime` wheel on
//! PyPI ships one the tests use.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use edgefleet_shared::ModelFormat;
use ort::environment::Environment;
use ort::ep::ExecutionProvider;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};

use super::select::RuntimeEntry;
use super::{Engine, EngineError, IoSpec};
use crate::config::OrtProvider;
use crate::tensor::{DataType, Tensor, TensorData};

pub const ONNXRUNTIME: &str = "onnxruntime";
/// The library's file name, for the loader's search path and the package.
pub const LIBRARY: &str = "libonnxruntime.so";
/// ONNX Runtime with its CUDA execution provider: a runtime of its own, so
/// the per-model choice weighs the GPU against the CPU (small models are
/// often faster on the CPU than a kernel launch and two copies).
pub const ONNXRUNTIME_CUDA: &str = "onnxruntime-cuda";

fn load_error(e: impl std::fmt::Display) -> EngineError {
    load_failed(ONNXRUNTIME, e)
}

fn load_failed(runtime: &'static str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Load {
        runtime,
        reason: e.to_string(),
    }
}

fn run_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Runtime {
        runtime: ONNXRUNTIME,
        reason: e.to_string(),
    }
}

/// Loads the library once per process and returns the runtime entries
/// (the CPU one, then one per usable execution provider in `providers`),
/// or why ONNX Runtime is not available.
pub fn entries(
    library: Option<&Path>,
    providers: &[OrtProvider],
) -> Result<Vec<RuntimeEntry>, String> {
    static ENV: OnceLock<Result<Arc<Environment>, String>> = OnceLock::new();
    let path = super::runtimes::library_path(library, "ORT_DYLIB_PATH", LIBRARY);
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
    // The CPU runtime comes first: without a test vector it is the
    // reference the execution providers are compared with.
    let cpu_env = env.clone();
    let mut entries = vec![RuntimeEntry::new(
        ONNXRUNTIME,
        ModelFormat::Onnx,
        move |bytes, _| {
            OnnxRuntime::load(&cpu_env, bytes, None).map(|e| Box::new(e) as Box<dyn Engine>)
        },
    )];
    for &provider in providers {
        match provider {
            OrtProvider::Cuda => match ort::ep::CUDA::is_available() {
                Ok(true) => {
                    let env = env.clone();
                    entries.push(RuntimeEntry::new(
                        ONNXRUNTIME_CUDA,
                        ModelFormat::Onnx,
                        move |bytes, _| {
                            OnnxRuntime::load(&env, bytes, Some(provider))
                                .map(|e| Box::new(e) as Box<dyn Engine>)
                        },
                    ));
                }
                Ok(false) => tracing::warn!(
                    library = %path.display(),
                    "this ONNX Runtime was built without the CUDA execution provider (use a GPU build, e.g. the onnxruntime-gpu wheel's library); not offering onnxruntime-cuda"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot ask ONNX Runtime for its execution providers; not offering onnxruntime-cuda")
                }
            },
        }
    }
    Ok(entries)
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
    runtime: &'static str,
    session: Mutex<Session>,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
}

impl OnnxRuntime {
    /// Loads `bytes` on the CPU, or with `provider` (which must then take
    /// the model: a provider that fails to start is a load error, never a
    /// silent fall-back to the CPU under the provider's name).
    pub fn load(
        env: &Environment,
        bytes: &[u8],
        provider: Option<OrtProvider>,
    ) -> Result<Self, EngineError> {
        let (runtime, providers) = match provider {
            None => (
                ONNXRUNTIME,
                // No arena: a session's buffers go back to the allocator
                // between runs instead of staying reserved for the
                // largest run seen (idle memory matters more here than
                // the allocation, which is small next to the kernels).
                vec![ort::ep::CPU::default()
                    .with_arena_allocator(false)
                    .build()
                    .error_on_failure()],
            ),
            Some(OrtProvider::Cuda) => (
                ONNXRUNTIME_CUDA,
                vec![ort::ep::CUDA::default()
                    .with_device_id(0)
                    // TF32 matrix products drift ~1e-3 from the CPU
                    // reference the model was checked against.
                    .with_tf32(false)
                    .build()
                    .error_on_failure()],
            ),
        };
        let session = Session::builder(env)
            .map_err(|e| load_failed(runtime, e))?
            .with_execution_providers(providers)
            .map_err(|e| load_failed(runtime, e))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| load_failed(runtime, e))?
            .with_intra_threads(1)
            .map_err(|e| load_failed(runtime, e))?
            .with_inter_threads(1)
            .map_err(|e| load_failed(runtime, e))?
            // Errors come back as values and are reported by the agent;
            // ONNX Runtime's own stderr logging would only duplicate them.
            .with_log_level(ort::logging::LogLevel::Fatal)
            .map_err(|e| load_failed(runtime, e))?
            .commit_from_memory(bytes)
            .map_err(|e| load_failed(runtime, e))?;
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
            runtime,
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
        self.runtime
    }

    fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        self.run_session(inputs).map_err(|e| match e {
            // Errors name the runtime that served the request.
            EngineError::Runtime { reason, .. } => EngineError::Runtime {
                runtime: self.runtime,
                reason,
            },
            other => other,
        })
    }
}

impl OnnxRuntime {
    fn run_session(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
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
