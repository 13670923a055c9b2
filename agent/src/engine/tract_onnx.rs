//! ONNX models on `tract-onnx`, the pure-Rust runtime of the static build.
//!
//! All tract calls live in this file. The model is parsed, type-checked,
//! optimised and turned into a runnable plan once, in [`TractOnnx::load`].

use std::io::Cursor;
use std::sync::Arc;

use tract_onnx::prelude::{
    DatumType, Framework, InferenceModelExt, IntoRunnable, IntoTValue, IntoTensor, TValue, TVec,
    Tensor as TractTensor, TypedFact, TypedRunnableModel,
};

use tract_onnx::tract_core::internal::DimLike;

use super::{Engine, EngineError, IoSpec};
use crate::tensor::{DataType, Tensor, TensorData};

const RUNTIME: &str = "tract-onnx";

/// A planned tract model.
pub struct TractOnnx {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
}

fn load_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Load {
        runtime: RUNTIME,
        reason: format!("{e:#}"),
    }
}

fn to_datatype(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::Uint8,
        DatumType::U16 => DataType::Uint16,
        DatumType::U32 => DataType::Uint32,
        DatumType::U64 => DataType::Uint64,
        DatumType::I8 => DataType::Int8,
        DatumType::I16 => DataType::Int16,
        DatumType::I32 => DataType::Int32,
        DatumType::I64 => DataType::Int64,
        DatumType::F16 => DataType::Fp16,
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        _ => return None,
    })
}

fn io_spec(name: String, fact: &TypedFact) -> Result<IoSpec, EngineError> {
    let datatype = to_datatype(fact.datum_type.unquantized()).ok_or_else(|| {
        load_error(format!(
            "tensor {name:?} has datatype {:?}, which the local API cannot carry",
            fact.datum_type
        ))
    })?;
    let shape = fact.shape.iter().map(|d| d.to_usize().ok()).collect();
    Ok(IoSpec {
        name,
        datatype,
        shape,
    })
}

impl TractOnnx {
    pub fn load(bytes: &[u8]) -> Result<Self, EngineError> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut Cursor::new(bytes))
            .map_err(load_error)?;
        let input_names: Vec<String> = model
            .input_outlets()
            .map_err(load_error)?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let output_names: Vec<String> = model
            .output_outlets()
            .map_err(load_error)?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        let typed = model.into_optimized().map_err(load_error)?;
        let inputs = input_names
            .into_iter()
            .enumerate()
            .map(|(i, name)| io_spec(name, typed.input_fact(i).map_err(load_error)?))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = output_names
            .into_iter()
            .enumerate()
            .map(|(i, name)| io_spec(name, typed.output_fact(i).map_err(load_error)?))
            .collect::<Result<Vec<_>, _>>()?;
        let plan = typed.into_runnable().map_err(load_error)?;
        Ok(Self {
            plan,
            inputs,
            outputs,
        })
    }
}

/// Applies `$m!(Variant, rust_type)` for every tensor datatype.
macro_rules! each_type {
    ($m:ident) => {
        $m!(Bool, bool; Uint8, u8; Uint16, u16; Uint32, u32; Uint64, u64; Int8, i8; Int16, i16;
            Int32, i32; Int64, i64; Fp16, half::f16; Fp32, f32; Fp64, f64)
    };
}

fn to_tract(t: Tensor) -> Result<TValue, EngineError> {
    let shape = &t.shape;
    macro_rules! convert {
        ($($variant:ident, $ty:ty);*) => {
            match &t.data {
                $(TensorData::$variant(v) => TractTensor::from_shape(shape, v),)*
            }
        };
    }
    let tensor = each_type!(convert).map_err(|e| EngineError::Runtime {
        runtime: RUNTIME,
        reason: format!("input {:?}: {e}", t.name),
    })?;
    Ok(tensor.into_tvalue())
}

fn from_tract(name: &str, value: TValue) -> Result<Tensor, EngineError> {
    let tensor = value.into_tensor();
    let fail = |e: String| EngineError::Runtime {
        runtime: RUNTIME,
        reason: format!("output {name:?}: {e}"),
    };
    let datatype = to_datatype(tensor.datum_type().unquantized())
        .ok_or_else(|| fail(format!("unsupported output datatype {:?}", tensor.datum_type())))?;
    let view = tensor.try_as_plain_ram().map_err(|e| fail(e.to_string()))?;
    macro_rules! read {
        ($($variant:ident, $ty:ty);*) => {
            match datatype {
                $(DataType::$variant => TensorData::$variant(view.as_slice::<$ty>().map_err(|e| fail(e.to_string()))?.to_vec()),)*
            }
        };
    }
    let data = each_type!(read);
    Ok(Tensor {
        name: name.to_string(),
        shape: tensor.shape().to_vec(),
        data,
    })
}

impl Engine for TractOnnx {
    fn runtime(&self) -> &'static str {
        RUNTIME
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
            .map(to_tract)
            .collect::<Result<TVec<_>, _>>()?;
        let results = self.plan.run(values).map_err(|e| EngineError::Runtime {
            runtime: RUNTIME,
            reason: format!("{e:#}"),
        })?;
        results
            .into_iter()
            .zip(&self.outputs)
            .map(|(value, spec)| from_tract(&spec.name, value))
            .collect()
    }
}
