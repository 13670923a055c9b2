//! TFLite models on the TensorFlow Lite C library, loaded from
//! `libtensorflowlite_c.so` at run time (the native build,
//! `--features tflite`). It covers what tract-tflite cannot: fp16-weight
//! models (DEQUANTIZE), PRELU, and MediaPipe's XNNPACK-only custom ops.
//!
//! This is the crate's one FFI module and the only place `unsafe` is
//! allowed. The invariants it relies on:
//! - every function pointer comes from the same loaded library, which
//!   lives (in an `Arc`) as long as any model created from it;
//! - the model's flatbuffer bytes are owned by [`TfliteModel`] and outlive
//!   the `TfLiteModel` and interpreter that point into them;
//! - an interpreter is used by one thread at a time (it sits behind a
//!   `Mutex`), as the C API requires;
//! - buffers passed to `CopyFromBuffer`/`CopyToBuffer` have exactly the
//!   tensor's byte size, checked before each call.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use edgefleet_shared::ModelFormat;

use super::select::RuntimeEntry;
use super::{Engine, EngineError, IoSpec};
use crate::tensor::{DataType, Tensor, TensorData};

pub const TFLITE: &str = "tflite";

#[repr(C)]
struct Opaque {
    _private: [u8; 0],
}

type Status = c_int;

/// The subset of the TFLite C API the engine uses.
struct Api {
    _lib: libloading::Library,
    model_create: unsafe extern "C" fn(*const c_void, usize) -> *mut Opaque,
    model_delete: unsafe extern "C" fn(*mut Opaque),
    options_create: unsafe extern "C" fn() -> *mut Opaque,
    options_delete: unsafe extern "C" fn(*mut Opaque),
    options_set_threads: unsafe extern "C" fn(*mut Opaque, i32),
    options_add_delegate: unsafe extern "C" fn(*mut Opaque, *mut c_void),
    interpreter_create: unsafe extern "C" fn(*const Opaque, *const Opaque) -> *mut Opaque,
    interpreter_delete: unsafe extern "C" fn(*mut Opaque),
    input_count: unsafe extern "C" fn(*const Opaque) -> i32,
    input_tensor: unsafe extern "C" fn(*const Opaque, i32) -> *mut Opaque,
    output_count: unsafe extern "C" fn(*const Opaque) -> i32,
    output_tensor: unsafe extern "C" fn(*const Opaque, i32) -> *const Opaque,
    resize_input: unsafe extern "C" fn(*mut Opaque, i32, *const c_int, i32) -> Status,
    allocate: unsafe extern "C" fn(*mut Opaque) -> Status,
    invoke: unsafe extern "C" fn(*mut Opaque) -> Status,
    tensor_type: unsafe extern "C" fn(*const Opaque) -> c_int,
    tensor_num_dims: unsafe extern "C" fn(*const Opaque) -> i32,
    tensor_dim: unsafe extern "C" fn(*const Opaque, i32) -> i32,
    tensor_byte_size: unsafe extern "C" fn(*const Opaque) -> usize,
    tensor_name: unsafe extern "C" fn(*const Opaque) -> *const c_char,
    tensor_data: unsafe extern "C" fn(*const Opaque) -> *mut c_void,
    copy_from: unsafe extern "C" fn(*mut Opaque, *const c_void, usize) -> Status,
    copy_to: unsafe extern "C" fn(*const Opaque, *mut c_void, usize) -> Status,
    xnnpack_create: Option<unsafe extern "C" fn(*const c_void) -> *mut c_void>,
    xnnpack_delete: Option<unsafe extern "C" fn(*mut c_void)>,
    version: unsafe extern "C" fn() -> *const c_char,
}

impl Api {
    fn load(path: &Path) -> Result<Self, String> {
        // SAFETY: loading a shared library runs its initialisers; the
        // operator points the configuration at a TFLite C library.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the declared signature matches the C API header
                // (tensorflow/lite/c/c_api.h) for this symbol.
                *unsafe { lib.get($name) }
                    .map_err(|e| format!("{}: missing symbol: {e}", path.display()))?
            };
        }
        macro_rules! opt_sym {
            ($name:literal) => {
                // SAFETY: as above; absent in builds without XNNPACK.
                unsafe { lib.get($name) }.ok().map(|s| *s)
            };
        }
        Ok(Self {
            model_create: sym!(b"TfLiteModelCreate\0"),
            model_delete: sym!(b"TfLiteModelDelete\0"),
            options_create: sym!(b"TfLiteInterpreterOptionsCreate\0"),
            options_delete: sym!(b"TfLiteInterpreterOptionsDelete\0"),
            options_set_threads: sym!(b"TfLiteInterpreterOptionsSetNumThreads\0"),
            options_add_delegate: sym!(b"TfLiteInterpreterOptionsAddDelegate\0"),
            interpreter_create: sym!(b"TfLiteInterpreterCreate\0"),
            interpreter_delete: sym!(b"TfLiteInterpreterDelete\0"),
            input_count: sym!(b"TfLiteInterpreterGetInputTensorCount\0"),
            input_tensor: sym!(b"TfLiteInterpreterGetInputTensor\0"),
            output_count: sym!(b"TfLiteInterpreterGetOutputTensorCount\0"),
            output_tensor: sym!(b"TfLiteInterpreterGetOutputTensor\0"),
            resize_input: sym!(b"TfLiteInterpreterResizeInputTensor\0"),
            allocate: sym!(b"TfLiteInterpreterAllocateTensors\0"),
            invoke: sym!(b"TfLiteInterpreterInvoke\0"),
            tensor_type: sym!(b"TfLiteTensorType\0"),
            tensor_num_dims: sym!(b"TfLiteTensorNumDims\0"),
            tensor_dim: sym!(b"TfLiteTensorDim\0"),
            tensor_byte_size: sym!(b"TfLiteTensorByteSize\0"),
            tensor_name: sym!(b"TfLiteTensorName\0"),
            tensor_data: sym!(b"TfLiteTensorData\0"),
            copy_from: sym!(b"TfLiteTensorCopyFromBuffer\0"),
            copy_to: sym!(b"TfLiteTensorCopyToBuffer\0"),
            xnnpack_create: opt_sym!(b"TfLiteXNNPackDelegateCreate\0"),
            xnnpack_delete: opt_sym!(b"TfLiteXNNPackDelegateDelete\0"),
            version: sym!(b"TfLiteVersion\0"),
            _lib: lib,
        })
    }

    fn version(&self) -> String {
        // SAFETY: returns a static NUL-terminated string.
        unsafe { CStr::from_ptr((self.version)()) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Loads the library once per process and returns the runtime entry, or
/// why the TFLite C runtime is not available.
pub fn entry(library: Option<&Path>) -> Result<RuntimeEntry, String> {
    static API: OnceLock<Result<Arc<Api>, String>> = OnceLock::new();
    let path: PathBuf = library
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("TFLITE_C_LIBRARY").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("libtensorflowlite_c.so"));
    let api = API.get_or_init(|| Api::load(&path).map(Arc::new)).clone()?;
    tracing::info!(library = %path.display(), version = %api.version(), xnnpack = api.xnnpack_create.is_some(), "TFLite C runtime available");
    Ok(RuntimeEntry::new(
        TFLITE,
        ModelFormat::Tflite,
        move |bytes, _| {
            TfliteModel::load(Arc::clone(&api), bytes).map(|e| Box::new(e) as Box<dyn Engine>)
        },
    ))
}

fn load_error(reason: impl Into<String>) -> EngineError {
    EngineError::Load {
        runtime: TFLITE,
        reason: reason.into(),
    }
}

fn run_error(reason: impl Into<String>) -> EngineError {
    EngineError::Runtime {
        runtime: TFLITE,
        reason: reason.into(),
    }
}

fn to_datatype(t: c_int) -> Option<DataType> {
    Some(match t {
        1 => DataType::Fp32,
        2 => DataType::Int32,
        3 => DataType::Uint8,
        4 => DataType::Int64,
        6 => DataType::Bool,
        7 => DataType::Int16,
        9 => DataType::Int8,
        10 => DataType::Fp16,
        11 => DataType::Fp64,
        13 => DataType::Uint64,
        16 => DataType::Uint32,
        _ => return None,
    })
}

/// Raw pointers owned by one loaded model.
struct Handles {
    model: *mut Opaque,
    options: *mut Opaque,
    interpreter: *mut Opaque,
    delegate: *mut c_void,
    /// Tensors must be (re)allocated before the next use: inputs were
    /// resized, or the last allocation failed (tensor buffers may then be
    /// missing, and touching them would crash).
    needs_allocation: bool,
}

// SAFETY: the handles are only used under the `Mutex` in `TfliteModel`,
// one thread at a time, which the C API allows.
unsafe impl Send for Handles {}

/// A TFLite model with its interpreter.
pub struct TfliteModel {
    api: Arc<Api>,
    handles: Mutex<Handles>,
    _bytes: Box<[u8]>,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
}

impl TfliteModel {
    fn load(api: Arc<Api>, bytes: &[u8]) -> Result<Self, EngineError> {
        let bytes: Box<[u8]> = bytes.into();
        // SAFETY: `bytes` is owned by the returned value and outlives the
        // model and interpreter; every handle is checked for null and freed
        // on every path (see `Drop`).
        unsafe {
            let model = (api.model_create)(bytes.as_ptr().cast(), bytes.len());
            if model.is_null() {
                return Err(load_error("not a valid TFLite flatbuffer"));
            }
            let mut handles = Handles {
                model,
                options: (api.options_create)(),
                interpreter: std::ptr::null_mut(),
                delegate: std::ptr::null_mut(),
                needs_allocation: false,
            };
            (api.options_set_threads)(handles.options, 1);
            // XNNPACK runs float models fast and provides MediaPipe's
            // custom ops. Its options struct has grown across versions;
            // pass a zeroed, generously sized buffer with num_threads = 1.
            if let Some(create) = api.xnnpack_create {
                let mut options = [0i32; 32];
                options[0] = 1;
                handles.delegate = create(options.as_ptr().cast());
                if !handles.delegate.is_null() {
                    (api.options_add_delegate)(handles.options, handles.delegate);
                }
            }
            handles.interpreter = (api.interpreter_create)(handles.model, handles.options);
            let interpreter = handles.interpreter;
            // Built before the check so that its Drop frees whatever was
            // created, on this error path too.
            let engine = Self {
                api: Arc::clone(&api),
                handles: Mutex::new(handles),
                _bytes: bytes,
                inputs: Vec::new(),
                outputs: Vec::new(),
            };
            if interpreter.is_null() {
                return Err(load_error(
                    "the TFLite interpreter refused the model (unsupported op or op version)",
                ));
            }
            if (api.allocate)(interpreter) != 0 {
                return Err(load_error("cannot allocate tensors for the model"));
            }
            let mut engine = engine;
            engine.inputs = (0..(api.input_count)(interpreter))
                .map(|i| engine.spec((api.input_tensor)(interpreter, i)))
                .collect::<Result<_, _>>()?;
            engine.outputs = (0..(api.output_count)(interpreter))
                .map(|i| engine.spec((api.output_tensor)(interpreter, i)))
                .collect::<Result<_, _>>()?;
            Ok(engine)
        }
    }

    /// # Safety
    /// `tensor` must be a live tensor of this model's interpreter.
    unsafe fn spec(&self, tensor: *const Opaque) -> Result<IoSpec, EngineError> {
        let api = &self.api;
        let name = CStr::from_ptr((api.tensor_name)(tensor))
            .to_string_lossy()
            .into_owned();
        let ty = (api.tensor_type)(tensor);
        let datatype = to_datatype(ty).ok_or_else(|| {
            load_error(format!(
                "tensor {name:?} has TFLite type {ty}, which the local API cannot carry"
            ))
        })?;
        let shape = (0..(api.tensor_num_dims)(tensor))
            .map(|d| {
                usize::try_from((api.tensor_dim)(tensor, d))
                    .ok()
                    .filter(|&d| d > 0)
            })
            .collect();
        Ok(IoSpec {
            name,
            datatype,
            shape,
        })
    }
}

impl Drop for TfliteModel {
    fn drop(&mut self) {
        let h = self.handles.get_mut().map(|h| {
            std::mem::replace(
                h,
                Handles {
                    model: std::ptr::null_mut(),
                    options: std::ptr::null_mut(),
                    interpreter: std::ptr::null_mut(),
                    delegate: std::ptr::null_mut(),
                    needs_allocation: false,
                },
            )
        });
        let Ok(h) = h else { return };
        // SAFETY: each handle was created by this library, is freed once,
        // interpreter before options/delegate/model as the API requires.
        unsafe {
            if !h.interpreter.is_null() {
                (self.api.interpreter_delete)(h.interpreter);
            }
            if !h.options.is_null() {
                (self.api.options_delete)(h.options);
            }
            if let (Some(delete), false) = (self.api.xnnpack_delete, h.delegate.is_null()) {
                delete(h.delegate);
            }
            if !h.model.is_null() {
                (self.api.model_delete)(h.model);
            }
        }
    }
}

impl Engine for TfliteModel {
    fn runtime(&self) -> &'static str {
        TFLITE
    }

    fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        let api = &self.api;
        let mut handles = self
            .handles
            .lock()
            .map_err(|_| run_error("interpreter lock poisoned"))?;
        let interpreter = handles.interpreter;
        // SAFETY: the interpreter is live and used by this thread only
        // (mutex held); buffer sizes are checked against the tensors.
        unsafe {
            for (i, input) in inputs.iter().enumerate() {
                let tensor = (api.input_tensor)(interpreter, i as i32);
                let current: Vec<usize> = (0..(api.tensor_num_dims)(tensor))
                    .map(|d| (api.tensor_dim)(tensor, d).max(0) as usize)
                    .collect();
                if current != input.shape {
                    let dims: Vec<c_int> = input.shape.iter().map(|&d| d as c_int).collect();
                    handles.needs_allocation = true;
                    if (api.resize_input)(interpreter, i as i32, dims.as_ptr(), dims.len() as i32)
                        != 0
                    {
                        return Err(run_error(format!(
                            "cannot resize input {:?} to {:?}",
                            input.name, input.shape
                        )));
                    }
                }
            }
            if handles.needs_allocation {
                if (api.allocate)(interpreter) != 0 {
                    return Err(run_error("cannot allocate tensors for these input shapes"));
                }
                handles.needs_allocation = false;
            }
            for (i, input) in inputs.iter().enumerate() {
                let tensor = (api.input_tensor)(interpreter, i as i32);
                let bytes = input.data.to_le_bytes();
                let size = (api.tensor_byte_size)(tensor);
                if bytes.len() != size {
                    return Err(run_error(format!(
                        "input {:?} has {} bytes, the interpreter expects {size}",
                        input.name,
                        bytes.len()
                    )));
                }
                if size > 0 && (api.tensor_data)(tensor).is_null() {
                    handles.needs_allocation = true;
                    return Err(run_error(format!("input {:?} has no buffer", input.name)));
                }
                if (api.copy_from)(tensor, bytes.as_ptr().cast(), bytes.len()) != 0 {
                    return Err(run_error(format!("cannot copy input {:?}", input.name)));
                }
            }
            if (api.invoke)(interpreter) != 0 {
                // A failed invoke can leave tensors half prepared.
                handles.needs_allocation = true;
                return Err(run_error("TFLite interpreter failed to run the model"));
            }
            self.outputs
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    let tensor = (api.output_tensor)(interpreter, i as i32);
                    let size = (api.tensor_byte_size)(tensor);
                    if size > 0 && (api.tensor_data)(tensor).is_null() {
                        return Err(run_error(format!("output {:?} has no buffer", spec.name)));
                    }
                    let mut buffer = vec![0u8; size];
                    if (api.copy_to)(tensor, buffer.as_mut_ptr().cast(), size) != 0 {
                        return Err(run_error(format!("cannot read output {:?}", spec.name)));
                    }
                    let shape = (0..(api.tensor_num_dims)(tensor))
                        .map(|d| (api.tensor_dim)(tensor, d).max(0) as usize)
                        .collect();
                    let data =
                        TensorData::from_le_bytes(spec.datatype, &buffer).map_err(run_error)?;
                    Ok(Tensor {
                        name: spec.name.clone(),
                        shape,
                        data,
                    })
                })
                .collect()
        }
    }
}
