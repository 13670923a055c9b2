//! TFLite models on LiteRT, the successor of TensorFlow Lite, through its C
//! API (`libLiteRt.so`, the CompiledModel API) loaded at run time (the
//! native build, `--features litert`). It runs current op versions and
//! MediaPipe's custom ops (XNNPACK), which tract-tflite cannot.
//!
//! The declarations, in [`ffi`], follow the headers of LiteRT 2.3.0
//! (`litert/c/*.h`). Earlier releases export the same names with other
//! signatures; they are told apart by two functions that arrived with the
//! signatures used here, and refused when the library is loaded.
//!
//! This module and `ffi` are the crate's FFI module, where `unsafe` is
//! allowed. The invariants they rely on:
//! - every function pointer comes from the same loaded library, which lives
//!   (in an `Arc`, with the one environment made from it) as long as any
//!   model created from it;
//! - a model's flatbuffer bytes are owned by [`LiteRtModel`] and outlive the
//!   `LiteRtModel` handle, which reads them in place, and the compiled model;
//!   the compilation options outlive the compiled model too (the caller owns
//!   them);
//! - a compiled model and its tensor buffers are used by one thread at a
//!   time (they sit behind a `Mutex`);
//! - the environment is touched (models created, compiled, destroyed,
//!   buffers made) under one process-wide lock: the C API does not promise
//!   that it is thread-safe;
//! - structs passed by pointer have the headers' layout, checked by size
//!   assertions in `ffi`; a tensor buffer is locked before its host memory is
//!   touched, and exactly its packed size is copied, checked before each
//!   copy.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::ptr::null_mut;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use edgefleet_shared::ModelFormat;

mod ffi;

use ffi::{
    check, status_text, to_datatype, Api, Handle, Layout, RankedTensorType, Status,
    ACCELERATOR_CPU, CPU_OPTIONS, LOCK_READ, LOCK_WRITE, OK,
};

use super::select::RuntimeEntry;
use super::{Engine, EngineError, IoSpec};
use crate::tensor::{Tensor, TensorData};

pub const LITERT: &str = "litert";
/// The library's file name, for the loader's search path and the package.
pub const LIBRARY: &str = "libLiteRt.so";

/// Threads per model: one, as ONNX Runtime gets. The agent serves several
/// models on boards with 2-4 cores, and the per-model choice compares
/// runtimes on equal terms.
const THREADS: u32 = 1;

/// The loaded library and its one environment.
struct Runtime {
    api: Api,
    env: Handle,
    /// Serialises every use of `env` (see the module invariants).
    env_lock: Mutex<()>,
}

// SAFETY: `env` is only used under `env_lock`; the function pointers and
// the library handle are plain data.
unsafe impl Send for Runtime {}
// SAFETY: as above.
unsafe impl Sync for Runtime {}

impl Runtime {
    fn start(api: Api) -> Result<Self, String> {
        let mut env = null_mut();
        // SAFETY: no options (count 0, null array); `env` receives an owned
        // environment, destroyed in `Drop`.
        let status = unsafe { (api.create_environment)(0, std::ptr::null(), &mut env) };
        if status != OK || env.is_null() {
            return Err(format!(
                "cannot create a LiteRT environment: {}",
                status_text(status)
            ));
        }
        Ok(Self {
            api,
            env,
            env_lock: Mutex::new(()),
        })
    }

    fn env_guard(&self) -> MutexGuard<'_, ()> {
        // The lock guards no data, so a poisoned one is still good.
        self.env_lock.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // SAFETY: the environment was created in `start` and every model
        // made from it holds an `Arc` to this, so none is left.
        unsafe { (self.api.destroy_environment)(self.env) }
    }
}

/// Loads the library once per process and returns the runtime entry, or
/// why LiteRT is not available.
pub fn entry(library: Option<&Path>) -> Result<RuntimeEntry, String> {
    static RUNTIME: OnceLock<Result<Arc<Runtime>, String>> = OnceLock::new();
    let path = super::runtimes::library_path(library, "LITERT_LIBRARY", LIBRARY);
    let runtime = RUNTIME
        .get_or_init(|| Api::load(&path).and_then(Runtime::start).map(Arc::new))
        .clone()?;
    tracing::info!(library = %path.display(), "LiteRT runtime available");
    Ok(RuntimeEntry::new(
        LITERT,
        ModelFormat::Tflite,
        move |bytes, _| {
            LiteRtModel::load(Arc::clone(&runtime), bytes).map(|e| Box::new(e) as Box<dyn Engine>)
        },
    ))
}

fn load_error(reason: impl Into<String>) -> EngineError {
    EngineError::Load {
        runtime: LITERT,
        reason: reason.into(),
    }
}

fn run_error(reason: impl Into<String>) -> EngineError {
    EngineError::Runtime {
        runtime: LITERT,
        reason: reason.into(),
    }
}

/// Frees the CPU options payload made in [`LiteRtModel::load`]; LiteRT
/// calls it once, when the options list is destroyed.
///
/// # Safety
/// `payload` must come from `CString::into_raw` and not be freed since.
unsafe extern "C" fn free_cpu_options(payload: *mut c_void) {
    drop(CString::from_raw(payload.cast()));
}

/// One tensor buffer and the shape it was made for.
struct Buffer {
    handle: Handle,
    shape: Vec<usize>,
    /// Packed byte size: what is copied in or out.
    size: usize,
}

/// Raw handles owned by one loaded model.
struct Handles {
    model: Handle,
    options: Handle,
    compiled: Handle,
    /// The compiled model's current input shapes.
    input_dims: Vec<Vec<i32>>,
    /// Inputs were resized since the output shapes were last propagated.
    needs_allocation: bool,
    /// Buffers for the current shapes, made on first use.
    inputs: Vec<Buffer>,
    outputs: Vec<Buffer>,
}

// SAFETY: the handles are only used under the `Mutex` in `LiteRtModel`,
// one thread at a time, which the C API allows.
unsafe impl Send for Handles {}

/// A TFLite model compiled by LiteRT for the CPU.
pub struct LiteRtModel {
    runtime: Arc<Runtime>,
    handles: Mutex<Handles>,
    _bytes: Box<[u8]>,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
    /// The element type of each input and output (`LiteRtElementType`).
    input_types: Vec<c_int>,
    output_types: Vec<c_int>,
}

/// The declared shape (`shape_signature`, `-1` for a dynamic dimension) of
/// tensor `index` in the subgraph of signature `key`. LiteRT reports a
/// tensor's current shape only, which for a model exported with dynamic
/// dimensions is a placeholder (`[1, 1]` for `[-1, -1]`).
fn declared_shape(
    model: &tract_tflite::tflite::Model<'_>,
    key: &str,
    index: u32,
    name: &str,
) -> Option<Vec<i32>> {
    let subgraph = model
        .signature_defs()
        .and_then(|defs| defs.iter().find(|d| d.signature_key() == Some(key)))
        .map_or(0, |d| d.subgraph_index());
    let tensor = model
        .subgraphs()?
        .iter()
        .nth(subgraph as usize)?
        .tensors()?
        .iter()
        .nth(index as usize)?;
    if tensor.name() != Some(name) {
        return None;
    }
    Some(tensor.shape_signature()?.iter().collect())
}

/// Reads a C string owned by the model.
///
/// # Safety
/// `ptr` must be null or a NUL-terminated string that is alive.
unsafe fn owned_str(ptr: *const c_char) -> String {
    if ptr.is_null() {
        String::new()
    } else {
        CStr::from_ptr(ptr).to_string_lossy().into_owned()
    }
}

impl LiteRtModel {
    fn load(runtime: Arc<Runtime>, bytes: &[u8]) -> Result<Self, EngineError> {
        let bytes: Box<[u8]> = bytes.into();
        let api = &runtime.api;
        let mut model = null_mut();
        let status = {
            let _env = runtime.env_guard();
            // SAFETY: `bytes` is owned by the returned value (moved in
            // below: the heap block does not move) and outlives the model
            // handle; the environment is used under its lock.
            unsafe {
                (api.create_model_from_buffer)(
                    runtime.env,
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    &mut model,
                )
            }
        };
        if status != OK || model.is_null() {
            return Err(load_error(format!(
                "not a model LiteRT can read: {}",
                status_text(status)
            )));
        }
        // From here on `Drop` frees whatever was created, on every path.
        let mut engine = Self {
            runtime: Arc::clone(&runtime),
            handles: Mutex::new(Handles {
                model,
                options: null_mut(),
                compiled: null_mut(),
                input_dims: Vec::new(),
                needs_allocation: false,
                inputs: Vec::new(),
                outputs: Vec::new(),
            }),
            _bytes: bytes,
            inputs: Vec::new(),
            outputs: Vec::new(),
            input_types: Vec::new(),
            output_types: Vec::new(),
        };
        let flatbuffer = tract_tflite::tflite::root_as_model(&engine._bytes).ok();
        // SAFETY: `model` is live; every handle and string read here is
        // owned by it, and every out-pointer is a valid local.
        unsafe {
            let mut count = 0;
            check((api.num_model_signatures)(model, &mut count), "signatures")
                .map_err(load_error)?;
            if count == 0 {
                return Err(load_error("the model has no signature"));
            }
            let mut signature = null_mut();
            check(
                (api.model_signature)(model, 0, &mut signature),
                "signature 0",
            )
            .map_err(load_error)?;
            let mut key = std::ptr::null();
            check((api.signature_key)(signature, &mut key), "signature key").map_err(load_error)?;
            let key = owned_str(key);
            let describe = |tensor: Handle| -> Result<(IoSpec, c_int, Vec<i32>), EngineError> {
                let mut name = std::ptr::null();
                check((api.tensor_name)(tensor, &mut name), "tensor name").map_err(load_error)?;
                let name = owned_str(name);
                let mut ty = RankedTensorType {
                    element_type: 0,
                    layout: Layout::EMPTY,
                };
                check(
                    (api.ranked_tensor_type)(tensor, &mut ty),
                    &format!("tensor {name:?}"),
                )
                .map_err(|e| load_error(format!("{e} (a tensor of unknown rank?)")))?;
                let datatype = to_datatype(ty.element_type).map_err(|t| {
                    load_error(format!(
                        "tensor {name:?} has type {t}, which the agent's API cannot carry"
                    ))
                })?;
                let current = ty.layout.dims().to_vec();
                let mut index = 0;
                let indexed = (api.tensor_index)(tensor, &mut index) == OK;
                let declared = flatbuffer
                    .as_ref()
                    .filter(|_| indexed)
                    .and_then(|m| declared_shape(m, &key, index, &name))
                    .filter(|d| d.len() == current.len())
                    .unwrap_or_else(|| current.clone());
                let shape = declared
                    .iter()
                    .map(|&d| usize::try_from(d).ok().filter(|&d| d > 0))
                    .collect();
                let spec = IoSpec {
                    name,
                    datatype,
                    shape,
                };
                Ok((spec, ty.element_type, current))
            };
            let (mut inputs, mut outputs) = (0, 0);
            check((api.num_signature_inputs)(signature, &mut inputs), "inputs")
                .map_err(load_error)?;
            check(
                (api.num_signature_outputs)(signature, &mut outputs),
                "outputs",
            )
            .map_err(load_error)?;
            let mut input_dims = Vec::with_capacity(inputs);
            for i in 0..inputs {
                let mut tensor = null_mut();
                check((api.signature_input)(signature, i, &mut tensor), "input")
                    .map_err(load_error)?;
                let (spec, ty, dims) = describe(tensor)?;
                engine.inputs.push(spec);
                engine.input_types.push(ty);
                input_dims.push(dims);
            }
            for i in 0..outputs {
                let mut tensor = null_mut();
                check((api.signature_output)(signature, i, &mut tensor), "output")
                    .map_err(load_error)?;
                let (spec, ty, _) = describe(tensor)?;
                engine.outputs.push(spec);
                engine.output_types.push(ty);
            }
            let handles = engine
                .handles
                .get_mut()
                .map_err(|_| load_error("model lock poisoned"))?;
            handles.input_dims = input_dims;
            let mut options = null_mut();
            check((api.create_options)(&mut options), "options").map_err(load_error)?;
            handles.options = options;
            check(
                (api.set_accelerators)(options, ACCELERATOR_CPU),
                "CPU accelerator",
            )
            .map_err(load_error)?;
            if let Err(e) = set_threads(api, options, THREADS) {
                tracing::warn!(error = %e, "LiteRT: cannot set the CPU thread count; using its default");
            }
            let mut compiled = null_mut();
            let status = {
                let _env = runtime.env_guard();
                (api.create_compiled_model)(runtime.env, model, options, &mut compiled)
            };
            handles.compiled = compiled;
            if status != OK || compiled.is_null() {
                return Err(load_error(format!(
                    "LiteRT could not compile the model for the CPU (unsupported op?): {}",
                    status_text(status)
                )));
            }
        }
        Ok(engine)
    }

    /// Makes input and output buffers for the current input shapes,
    /// propagating resized shapes to the outputs first.
    ///
    /// # Safety
    /// `h` must be this model's handles, held under its lock, with no
    /// buffers.
    unsafe fn make_buffers(&self, h: &mut Handles) -> Result<(), EngineError> {
        let api = &self.runtime.api;
        let _env = self.runtime.env_guard();
        let mut layouts = vec![Layout::EMPTY; self.outputs.len()];
        check(
            (api.output_layouts)(
                h.compiled,
                0,
                layouts.len(),
                layouts.as_mut_ptr(),
                h.needs_allocation,
            ),
            "output shapes",
        )
        .map_err(run_error)?;
        h.needs_allocation = false;
        let compiled = h.compiled;
        let make =
            |requirements: unsafe extern "C" fn(Handle, usize, usize, *mut Handle) -> Status,
             index: usize,
             element_type: c_int,
             dims: &[i32]|
             -> Result<Buffer, String> {
                let shape = dims
                    .iter()
                    .map(|&d| {
                        usize::try_from(d).map_err(|_| format!("dimension {d} after resizing"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let layout = Layout::packed(dims).ok_or("more than 8 dimensions")?;
                let ty = RankedTensorType {
                    element_type,
                    layout,
                };
                let mut req = null_mut();
                check(
                    requirements(compiled, 0, index, &mut req),
                    "buffer requirements",
                )?;
                let mut handle = null_mut();
                check(
                    (api.create_buffer)(self.runtime.env, &ty, req, &mut handle),
                    "buffer",
                )?;
                let mut size = 0;
                if let Err(e) = check((api.buffer_packed_size)(handle, &mut size), "buffer size") {
                    (api.destroy_buffer)(handle);
                    return Err(e);
                }
                Ok(Buffer {
                    handle,
                    shape,
                    size,
                })
            };
        for (i, dims) in h.input_dims.clone().iter().enumerate() {
            let made = make(api.input_requirements, i, self.input_types[i], dims);
            h.inputs
                .push(made.map_err(|e| run_error(format!("input {i}: {e}")))?);
        }
        for (i, layout) in layouts.iter().enumerate() {
            let made = make(
                api.output_requirements,
                i,
                self.output_types[i],
                layout.dims(),
            );
            h.outputs
                .push(made.map_err(|e| run_error(format!("output {i}: {e}")))?);
        }
        Ok(())
    }

    /// # Safety
    /// `h` must be this model's handles, held under its lock.
    unsafe fn release_buffers(&self, h: &mut Handles) {
        for buffer in h.inputs.drain(..).chain(h.outputs.drain(..)) {
            (self.runtime.api.destroy_buffer)(buffer.handle);
        }
    }

    /// Resizes the compiled model's inputs to `inputs` where they differ,
    /// and makes buffers for the shapes.
    ///
    /// # Safety
    /// `h` must be this model's handles, held under its lock.
    unsafe fn prepare(&self, h: &mut Handles, inputs: &[Tensor]) -> Result<(), EngineError> {
        let api = &self.runtime.api;
        for (i, input) in inputs.iter().enumerate() {
            let dims = input
                .shape
                .iter()
                .map(|&d| c_int::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| run_error(format!("input {:?} is too large", input.name)))?;
            if dims == h.input_dims[i] {
                continue;
            }
            self.release_buffers(h);
            h.needs_allocation = true;
            let status = (api.resize_input)(h.compiled, 0, i, dims.as_ptr(), dims.len());
            check(
                status,
                &format!("cannot resize input {:?} to {:?}", input.name, input.shape),
            )
            .map_err(run_error)?;
            h.input_dims[i] = dims;
        }
        if h.inputs.is_empty() && h.outputs.is_empty() {
            if let Err(e) = self.make_buffers(h) {
                self.release_buffers(h);
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Sets the CPU accelerator's thread count through its options payload.
///
/// # Safety
/// `options` must be a live options handle of `api`'s library.
unsafe fn set_threads(api: &Api, options: Handle, threads: u32) -> Result<(), String> {
    let payload = CString::new(format!("num_threads = {threads}\n"))
        .map_err(|e| e.to_string())?
        .into_raw();
    let mut opaque = null_mut();
    let status = (api.create_opaque_options)(
        CPU_OPTIONS.as_ptr(),
        payload.cast(),
        free_cpu_options,
        &mut opaque,
    );
    if status != OK {
        // Not taken: LiteRT checks its arguments before owning the payload.
        free_cpu_options(payload.cast());
        return check(status, "CPU options");
    }
    let status = (api.add_opaque_options)(options, opaque);
    if status != OK {
        (api.destroy_opaque_options)(opaque);
    }
    check(status, "adding CPU options")
}

impl Drop for LiteRtModel {
    fn drop(&mut self) {
        let runtime = Arc::clone(&self.runtime);
        let Ok(h) = self.handles.get_mut() else {
            return;
        };
        let api = &runtime.api;
        let _env = runtime.env_guard();
        // SAFETY: each handle was created by this library and is freed
        // once: buffers and the compiled model before the options and the
        // model they use; the bytes (a field) are dropped after this.
        unsafe {
            for buffer in h.inputs.drain(..).chain(h.outputs.drain(..)) {
                (api.destroy_buffer)(buffer.handle);
            }
            if !h.compiled.is_null() {
                (api.destroy_compiled_model)(h.compiled);
            }
            if !h.options.is_null() {
                (api.destroy_options)(h.options);
            }
            if !h.model.is_null() {
                (api.destroy_model)(h.model);
            }
        }
        h.compiled = null_mut();
        h.options = null_mut();
        h.model = null_mut();
    }
}

impl Engine for LiteRtModel {
    fn runtime(&self) -> &'static str {
        LITERT
    }

    fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        let api = &self.runtime.api;
        let mut guard = self
            .handles
            .lock()
            .map_err(|_| run_error("compiled model lock poisoned"))?;
        let h = &mut *guard;
        // SAFETY: the compiled model and its buffers are live and used by
        // this thread only (mutex held); each buffer is locked around the
        // copy, which is exactly its packed size, checked first.
        unsafe {
            self.prepare(h, &inputs)?;
            for (input, buffer) in inputs.iter().zip(&h.inputs) {
                let bytes = input.data.to_le_bytes();
                if bytes.len() != buffer.size {
                    return Err(run_error(format!(
                        "input {:?} has {} bytes, the compiled model expects {}",
                        input.name,
                        bytes.len(),
                        buffer.size
                    )));
                }
                let mut host = null_mut();
                check(
                    (api.lock_buffer)(buffer.handle, &mut host, LOCK_WRITE),
                    "lock input",
                )
                .map_err(run_error)?;
                if !host.is_null() {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), host.cast::<u8>(), bytes.len());
                }
                check((api.unlock_buffer)(buffer.handle), "unlock input").map_err(run_error)?;
                if host.is_null() && !bytes.is_empty() {
                    return Err(run_error(format!(
                        "input {:?} has no host memory",
                        input.name
                    )));
                }
            }
            let mut ins: Vec<Handle> = h.inputs.iter().map(|b| b.handle).collect();
            let mut outs: Vec<Handle> = h.outputs.iter().map(|b| b.handle).collect();
            let status = (api.run)(
                h.compiled,
                0,
                ins.len(),
                ins.as_mut_ptr(),
                outs.len(),
                outs.as_mut_ptr(),
            );
            if status != OK {
                // Start from fresh buffers next time.
                self.release_buffers(h);
                return Err(run_error(format!(
                    "LiteRT failed to run the model: {}",
                    status_text(status)
                )));
            }
            self.outputs
                .iter()
                .zip(&h.outputs)
                .map(|(spec, buffer)| {
                    let mut host = null_mut();
                    check(
                        (api.lock_buffer)(buffer.handle, &mut host, LOCK_READ),
                        "lock output",
                    )
                    .map_err(run_error)?;
                    let mut bytes = vec![0u8; buffer.size];
                    if !host.is_null() {
                        std::ptr::copy_nonoverlapping(
                            host.cast::<u8>(),
                            bytes.as_mut_ptr(),
                            buffer.size,
                        );
                    }
                    check((api.unlock_buffer)(buffer.handle), "unlock output")
                        .map_err(run_error)?;
                    if host.is_null() && buffer.size > 0 {
                        return Err(run_error(format!(
                            "output {:?} has no host memory",
                            spec.name
                        )));
                    }
                    let data =
                        TensorData::from_le_bytes(spec.datatype, &bytes).map_err(run_error)?;
                    Ok(Tensor {
                        name: spec.name.clone(),
                        shape: buffer.shape.clone(),
                        data,
                    })
                })
                .collect()
        }
    }
}
