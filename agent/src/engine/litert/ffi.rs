//! The LiteRT C API as [`super`] uses it: the declarations, struct layouts
//! and enum values of the LiteRT 2.3.0 headers (`litert/c/*.h`), each named
//! where it is declared, and the library's loading. The invariants are the
//! parent module's.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::Path;

use crate::tensor::DataType;

#[repr(C)]
pub(super) struct Opaque {
    _private: [u8; 0],
}

/// `LiteRtStatus` (litert_common.h): 0 is success.
pub(super) type Status = c_int;
pub(super) const OK: Status = 0;

/// `kLiteRtHwAcceleratorCpu` (litert_common.h, `LiteRtHwAccelerators`).
pub(super) const ACCELERATOR_CPU: c_int = 1;
/// `LiteRtTensorBufferLockMode` (litert_common.h).
pub(super) const LOCK_READ: c_int = 0;
pub(super) const LOCK_WRITE: c_int = 1;
/// The identifier of the CPU (XNNPACK) accelerator's options, whose payload
/// is a NUL-terminated TOML text (litert/runtime/litert_cpu_options.cc in
/// 2.3.0; the library holds the string "xnnpack").
pub(super) const CPU_OPTIONS: &CStr = c"xnnpack";

/// `LITERT_TENSOR_MAX_RANK` (litert_layout.h).
pub(super) const MAX_RANK: usize = 8;

/// `LiteRtLayout` as litert/c/litert_layout.h of LiteRT 2.3.0 declares it:
/// `unsigned int rank : 7; bool has_strides : 1;` share one 4-byte unit
/// (rank in the low 7 bits with the GCC/Clang bit-field layout on the
/// little-endian targets LiteRT ships for), then `int32_t dimensions[8]`
/// and `uint32_t strides[8]`: 68 bytes, 4-aligned.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct Layout {
    pub(super) rank_and_has_strides: u32,
    pub(super) dimensions: [i32; MAX_RANK],
    pub(super) strides: [u32; MAX_RANK],
}

/// `LiteRtRankedTensorType` (litert/c/litert_model_types.h, which asserts
/// its size is 72 on 64-bit targets and the layout's offset is 4).
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct RankedTensorType {
    /// `LiteRtElementType`, the TFLite type numbers.
    pub(super) element_type: c_int,
    pub(super) layout: Layout,
}

const _: () = assert!(std::mem::size_of::<Layout>() == 68);
const _: () = assert!(std::mem::size_of::<RankedTensorType>() == 72);
const _: () = assert!(std::mem::offset_of!(RankedTensorType, layout) == 4);
#[cfg(target_endian = "big")]
compile_error!("the LiteRtLayout bit-field is read as little-endian");

impl Layout {
    pub(super) const EMPTY: Layout = Layout {
        rank_and_has_strides: 0,
        dimensions: [0; MAX_RANK],
        strides: [0; MAX_RANK],
    };

    pub(super) fn dims(&self) -> &[i32] {
        let rank = (self.rank_and_has_strides & 0x7f) as usize;
        &self.dimensions[..rank.min(MAX_RANK)]
    }

    /// A packed (stride-less) layout of `dims`.
    pub(super) fn packed(dims: &[i32]) -> Option<Self> {
        if dims.len() > MAX_RANK {
            return None;
        }
        let mut layout = Layout::EMPTY;
        layout.rank_and_has_strides = dims.len() as u32;
        layout.dimensions[..dims.len()].copy_from_slice(dims);
        Some(layout)
    }
}

pub(super) type Handle = *mut Opaque;

/// The subset of the LiteRT C API the engine uses, with the signatures of
/// the 2.3.0 headers named on each group.
pub(super) struct Api {
    _lib: libloading::Library,
    // litert_environment.h
    pub(super) create_environment:
        unsafe extern "C" fn(c_int, *const c_void, *mut Handle) -> Status,
    pub(super) destroy_environment: unsafe extern "C" fn(Handle),
    // litert_model.h
    pub(super) create_model_from_buffer:
        unsafe extern "C" fn(Handle, *const c_void, usize, *mut Handle) -> Status,
    pub(super) destroy_model: unsafe extern "C" fn(Handle),
    pub(super) num_model_signatures: unsafe extern "C" fn(Handle, *mut usize) -> Status,
    pub(super) model_signature: unsafe extern "C" fn(Handle, usize, *mut Handle) -> Status,
    pub(super) signature_key: unsafe extern "C" fn(Handle, *mut *const c_char) -> Status,
    pub(super) num_signature_inputs: unsafe extern "C" fn(Handle, *mut usize) -> Status,
    pub(super) num_signature_outputs: unsafe extern "C" fn(Handle, *mut usize) -> Status,
    pub(super) signature_input: unsafe extern "C" fn(Handle, usize, *mut Handle) -> Status,
    pub(super) signature_output: unsafe extern "C" fn(Handle, usize, *mut Handle) -> Status,
    pub(super) tensor_name: unsafe extern "C" fn(Handle, *mut *const c_char) -> Status,
    pub(super) tensor_index: unsafe extern "C" fn(Handle, *mut u32) -> Status,
    pub(super) ranked_tensor_type: unsafe extern "C" fn(Handle, *mut RankedTensorType) -> Status,
    // litert_options.h, litert_opaque_options.h
    pub(super) create_options: unsafe extern "C" fn(*mut Handle) -> Status,
    pub(super) destroy_options: unsafe extern "C" fn(Handle),
    pub(super) set_accelerators: unsafe extern "C" fn(Handle, c_int) -> Status,
    pub(super) create_opaque_options: unsafe extern "C" fn(
        *const c_char,
        *mut c_void,
        unsafe extern "C" fn(*mut c_void),
        *mut Handle,
    ) -> Status,
    pub(super) destroy_opaque_options: unsafe extern "C" fn(Handle),
    pub(super) add_opaque_options: unsafe extern "C" fn(Handle, Handle) -> Status,
    // litert_compiled_model.h
    pub(super) create_compiled_model:
        unsafe extern "C" fn(Handle, Handle, Handle, *mut Handle) -> Status,
    pub(super) destroy_compiled_model: unsafe extern "C" fn(Handle),
    pub(super) input_requirements:
        unsafe extern "C" fn(Handle, usize, usize, *mut Handle) -> Status,
    pub(super) output_requirements:
        unsafe extern "C" fn(Handle, usize, usize, *mut Handle) -> Status,
    pub(super) resize_input:
        unsafe extern "C" fn(Handle, usize, usize, *const c_int, usize) -> Status,
    pub(super) output_layouts:
        unsafe extern "C" fn(Handle, usize, usize, *mut Layout, bool) -> Status,
    pub(super) run:
        unsafe extern "C" fn(Handle, usize, usize, *mut Handle, usize, *mut Handle) -> Status,
    // litert_tensor_buffer.h
    pub(super) create_buffer:
        unsafe extern "C" fn(Handle, *const RankedTensorType, Handle, *mut Handle) -> Status,
    pub(super) destroy_buffer: unsafe extern "C" fn(Handle),
    pub(super) buffer_packed_size: unsafe extern "C" fn(Handle, *mut usize) -> Status,
    pub(super) lock_buffer: unsafe extern "C" fn(Handle, *mut *mut c_void, c_int) -> Status,
    pub(super) unlock_buffer: unsafe extern "C" fn(Handle) -> Status,
}

impl Api {
    pub(super) fn load(path: &Path) -> Result<Self, String> {
        // SAFETY: loading a shared library runs its initialisers; the
        // operator points the configuration at a LiteRT C library.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        // Earlier LiteRT releases export most of these names with other
        // signatures (no environment argument when creating a model, a
        // payload version when creating opaque options): calling them as
        // declared here would corrupt memory. These two functions arrived
        // with the signatures used here, so a library without them is
        // refused.
        for marker in ["LiteRtCreateModelFromFd", "LiteRtSetOpaqueOptionsHash"] {
            // SAFETY: only looked up, never called.
            let found = unsafe { lib.get::<unsafe extern "C" fn()>(marker.as_bytes()) }.is_ok();
            if !found {
                return Err(format!(
                    "{}: no {marker}: not LiteRT 2.3 or newer, whose C API this agent uses",
                    path.display()
                ));
            }
        }
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the declared signature matches the LiteRT 2.3.0
                // C headers for this symbol (named on the field).
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("{}: missing symbol: {e}", path.display()))?
            };
        }
        Ok(Self {
            create_environment: sym!("LiteRtCreateEnvironment"),
            destroy_environment: sym!("LiteRtDestroyEnvironment"),
            create_model_from_buffer: sym!("LiteRtCreateModelFromBuffer"),
            destroy_model: sym!("LiteRtDestroyModel"),
            num_model_signatures: sym!("LiteRtGetNumModelSignatures"),
            model_signature: sym!("LiteRtGetModelSignature"),
            signature_key: sym!("LiteRtGetSignatureKey"),
            num_signature_inputs: sym!("LiteRtGetNumSignatureInputs"),
            num_signature_outputs: sym!("LiteRtGetNumSignatureOutputs"),
            signature_input: sym!("LiteRtGetSignatureInputTensorByIndex"),
            signature_output: sym!("LiteRtGetSignatureOutputTensorByIndex"),
            tensor_name: sym!("LiteRtGetTensorName"),
            tensor_index: sym!("LiteRtGetTensorIndex"),
            ranked_tensor_type: sym!("LiteRtGetRankedTensorType"),
            create_options: sym!("LiteRtCreateOptions"),
            destroy_options: sym!("LiteRtDestroyOptions"),
            set_accelerators: sym!("LiteRtSetOptionsHardwareAccelerators"),
            create_opaque_options: sym!("LiteRtCreateOpaqueOptions"),
            destroy_opaque_options: sym!("LiteRtDestroyOpaqueOptions"),
            add_opaque_options: sym!("LiteRtAddOpaqueOptions"),
            create_compiled_model: sym!("LiteRtCreateCompiledModel"),
            destroy_compiled_model: sym!("LiteRtDestroyCompiledModel"),
            input_requirements: sym!("LiteRtGetCompiledModelInputBufferRequirements"),
            output_requirements: sym!("LiteRtGetCompiledModelOutputBufferRequirements"),
            resize_input: sym!("LiteRtCompiledModelResizeInputTensor"),
            output_layouts: sym!("LiteRtGetCompiledModelOutputTensorLayouts"),
            run: sym!("LiteRtRunCompiledModel"),
            create_buffer: sym!("LiteRtCreateManagedTensorBufferFromRequirements"),
            destroy_buffer: sym!("LiteRtDestroyTensorBuffer"),
            buffer_packed_size: sym!("LiteRtGetTensorBufferPackedSize"),
            lock_buffer: sym!("LiteRtLockTensorBuffer"),
            unlock_buffer: sym!("LiteRtUnlockTensorBuffer"),
            _lib: lib,
        })
    }
}

pub(super) fn status_text(status: Status) -> String {
    let name = match status {
        1 => "invalid argument",
        2 => "memory allocation failure",
        3 => "runtime failure",
        4 => "missing input tensor",
        5 => "unsupported",
        6 => "not found",
        7 => "timeout",
        8 => "wrong version",
        9 => "unknown error",
        10 => "already exists",
        100 => "cancelled",
        500 => "file I/O error",
        501 => "invalid flatbuffer",
        502 => "dynamic loading error",
        503 => "serialization error",
        504 => "compilation error",
        _ => return format!("status {status}"),
    };
    format!("{name} (status {status})")
}

pub(super) fn check(status: Status, what: &str) -> Result<(), String> {
    if status == OK {
        Ok(())
    } else {
        Err(format!("{what}: {}", status_text(status)))
    }
}

/// The agent's datatype for a `LiteRtElementType`, or the type's name.
pub(super) fn to_datatype(t: c_int) -> Result<DataType, &'static str> {
    Ok(match t {
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
        17 => DataType::Uint16,
        0 => return Err("NONE"),
        5 => return Err("STRING"),
        8 => return Err("COMPLEX64"),
        12 => return Err("COMPLEX128"),
        14 => return Err("RESOURCE"),
        15 => return Err("VARIANT"),
        18 => return Err("INT4"),
        19 => return Err("BFLOAT16"),
        20 => return Err("INT2"),
        _ => return Err("an unknown type"),
    })
}
