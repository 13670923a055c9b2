//! ONNX and TFLite models on tract (`tract-onnx`, `tract-tflite`), the
//! pure-Rust runtimes of the static build.
//!
//! All tract calls live in this module (this file and `plans`). A model is
//! parsed, type-checked, optimised and turned into a runnable plan once, in
//! [`TractEngine::load_onnx`] or [`TractEngine::load_tflite`]. A model with
//! dynamic input dimensions also gets plans specialised to the input shapes
//! it actually serves (`plans::ShapePlans`): tract picks its depthwise,
//! lazy-im2col and direct convolutions, and its by-scalar binary operators,
//! only where shapes are concrete. On a symbolic plan every convolution is
//! an eager im2col and a matrix product, each depthwise one a product per
//! channel.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use tract_onnx::prelude::{
    DatumType, Fact, Framework, Graph, InferenceFact, InferenceModel, InferenceModelExt,
    IntoRunnable, IntoTValue, IntoTensor, Op, TDim, TValue, TVec, Tensor as TractTensor,
    TractResult, TypedFact, TypedModel, TypedRunnableModel,
};

use tract_onnx::tract_core::internal::DimLike;
use tract_onnx::tract_hir::infer::Factoid;

use edgefleet_shared::TensorSpec;

use super::{Engine, EngineError, IoSpec};
use crate::tensor::{DataType, Tensor, TensorData};

mod plans;

use plans::ShapePlans;

/// Runtime names as reported in metadata and status.
pub const TRACT_ONNX: &str = "tract-onnx";
pub const TRACT_TFLITE: &str = "tract-tflite";

/// Sets tract's kernel choice before its first use (it probes the CPU once).
///
/// tract 0.23.9's AMX int8 matrix kernel (`avx512amx_mmm_i32_16x16`, picked
/// on Intel CPUs with AMX, e.g. Sapphire Rapids) crashed the process with
/// SIGSEGV inside the kernel in about 1 of 10 runs of the real-model test
/// here (core dump); with it taken out (`TRACT_CPU_ISA=-amx-int8`) 16 runs
/// in a row passed. Int8 models then use the AVX-512 VNNI kernels. The
/// value sits below the environment: setting `TRACT_CPU_ISA` overrides it
/// (an empty value puts AMX back).
pub fn configure_kernels() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(target_arch = "x86_64")]
        if let Err(e) =
            tract_onnx::tract_core::knobs::set_config_global("TRACT_CPU_ISA", "-amx-int8")
        {
            tracing::warn!(error = %e, "cannot take tract's AMX int8 kernels out");
        }
    });
}

/// A planned tract model.
pub struct TractEngine {
    runtime: &'static str,
    /// Runs every input shape the model accepts.
    plan: Arc<TypedRunnableModel>,
    /// Faster plans for the shapes served, when `plan` has dynamic input
    /// dimensions.
    shapes: Option<ShapePlans>,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
}

/// The input shapes of one call, one list of dimensions per input.
type Shapes = Vec<Vec<usize>>;

fn load_error(runtime: &'static str) -> impl Fn(tract_onnx::prelude::TractError) -> EngineError {
    move |e| EngineError::Load {
        runtime,
        reason: brief(&format!("{e:#}")),
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

fn io_spec(runtime: &'static str, name: String, fact: &TypedFact) -> Result<IoSpec, EngineError> {
    let datatype = to_datatype(fact.datum_type.unquantized()).ok_or_else(|| EngineError::Load {
        runtime,
        reason: format!(
            "tensor {name:?} has datatype {:?}, which the local API cannot carry",
            fact.datum_type
        ),
    })?;
    let shape = fact.shape.iter().map(|d| d.to_usize().ok()).collect();
    Ok(IoSpec {
        name,
        datatype,
        shape,
    })
}

/// tract's errors can embed whole operator dumps; keep them readable in
/// events and logs: whitespace collapsed, at most 400 characters.
fn brief(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(400) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

/// Fixes input dimensions before tract types the graph: a dimension the
/// configuration declares (a hint of the same rank with a non-negative
/// size) becomes that size; an unnamed dimension (`?`) gets its own symbol
/// so it stays dynamic like a named one. Many exported models (PP-OCR)
/// only plan in tract with concrete input shapes.
fn apply_shape_hints(model: &mut InferenceModel, hints: &[TensorSpec]) -> TractResult<()> {
    let mut applied_hint = false;
    for i in 0..model.inputs.len() {
        let fact = model.input_fact(i)?.clone();
        if fact.shape.is_open() {
            continue;
        }
        let name = model.node(model.inputs[i].node).name.clone();
        let hint = hints
            .iter()
            .find(|h| h.name == name && h.shape.len() == fact.shape.dims().count());
        let mut renamed = false;
        let dims: Vec<TDim> = fact
            .shape
            .dims()
            .enumerate()
            .map(|(j, d)| {
                if let Some(size) = hint.and_then(|h| usize::try_from(h.shape[j]).ok()) {
                    renamed = true;
                    return TDim::Val(size as i64);
                }
                d.concretize().unwrap_or_else(|| {
                    renamed = true;
                    TDim::Sym(model.symbols.sym(&format!("input{i}_dim{j}")))
                })
            })
            .collect();
        if renamed {
            let mut fact = fact;
            fact.shape = dims.into_iter().collect();
            model.set_input_fact(i, fact)?;
            applied_hint |= hint.is_some();
        }
    }
    // Declared output shapes name the same symbols the hints just fixed;
    // let tract infer them again instead of contradicting them.
    if applied_hint {
        for o in 0..model.outputs.len() {
            let datum_type = model.output_fact(o)?.datum_type;
            model.set_output_fact(
                o,
                InferenceFact {
                    datum_type,
                    ..InferenceFact::default()
                },
            )?;
        }
    }
    Ok(())
}

/// Input node names and output labels of a parsed graph, in order.
fn io_names<F, O>(model: &Graph<F, O>) -> TractResult<(Vec<String>, Vec<String>)>
where
    F: Fact + Clone + 'static,
    O: std::fmt::Debug + std::fmt::Display + AsRef<dyn Op> + AsMut<dyn Op> + Clone + 'static,
{
    let inputs = model
        .input_outlets()?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    let outputs = model
        .output_outlets()?
        .iter()
        .map(|o| {
            model
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| model.node(o.node).name.clone())
        })
        .collect();
    Ok((inputs, outputs))
}

impl TractEngine {
    /// Parses, optimises and plans an ONNX model.
    /// Shape hints are used to plan only if the model does not plan without
    /// them: fixing a dimension the model names can contradict its own
    /// intermediate shape annotations. Otherwise the model stays dynamic
    /// and the hinted shapes get specialised plans right away.
    pub fn load_onnx(bytes: &[u8], hints: &[TensorSpec]) -> Result<Self, EngineError> {
        configure_kernels();
        match Self::load_onnx_with(bytes, &[]) {
            Err(first) if hints.iter().any(|h| h.shape.iter().any(|&d| d >= 0)) => {
                Self::load_onnx_with(bytes, hints).map_err(|_| first)
            }
            Ok(engine) => Ok(engine.prepared_for(hints)),
            result => result,
        }
    }

    fn load_onnx_with(bytes: &[u8], hints: &[TensorSpec]) -> Result<Self, EngineError> {
        let err = load_error(TRACT_ONNX);
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut Cursor::new(bytes))
            .map_err(&err)?;
        apply_shape_hints(&mut model, hints).map_err(&err)?;
        // Names come from the parsed model: optimisation may rename nodes.
        let (input_names, output_names) = io_names(&model).map_err(&err)?;
        let typed = model.into_typed().map_err(&err)?;
        Self::plan(TRACT_ONNX, typed, input_names, output_names)
    }

    /// Parses, optimises and plans a TFLite model; `hints` as for
    /// [`TractEngine::load_onnx`].
    pub fn load_tflite(bytes: &[u8], hints: &[TensorSpec]) -> Result<Self, EngineError> {
        configure_kernels();
        let err = load_error(TRACT_TFLITE);
        let model = tract_tflite::tflite()
            .model_for_read(&mut Cursor::new(bytes))
            .map_err(&err)?;
        let (input_names, output_names) = io_names(&model).map_err(&err)?;
        Ok(Self::plan(TRACT_TFLITE, model, input_names, output_names)?.prepared_for(hints))
    }

    fn plan(
        runtime: &'static str,
        typed: TypedModel,
        input_names: Vec<String>,
        output_names: Vec<String>,
    ) -> Result<Self, EngineError> {
        let err = load_error(runtime);
        let started = Instant::now();
        let decluttered = typed.into_decluttered().map_err(&err)?;
        let mut optimized = decluttered.clone();
        optimized.optimize().map_err(&err)?;
        let build_cost = started.elapsed();
        let inputs = input_names
            .into_iter()
            .enumerate()
            .map(|(i, name)| io_spec(runtime, name, optimized.input_fact(i).map_err(&err)?))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = output_names
            .into_iter()
            .enumerate()
            .map(|(i, name)| io_spec(runtime, name, optimized.output_fact(i).map_err(&err)?))
            .collect::<Result<Vec<_>, _>>()?;
        let plan = optimized.into_runnable().map_err(&err)?;
        let shapes = ShapePlans::new(decluttered, build_cost).map_err(&err)?;
        Ok(Self {
            runtime,
            plan,
            shapes,
            inputs,
            outputs,
        })
    }

    /// Builds the specialised plan for the shapes `hints` declare, when
    /// they give every input a concrete shape.
    fn prepared_for(self, hints: &[TensorSpec]) -> Self {
        let Some(shape_plans) = &self.shapes else {
            return self;
        };
        let shapes: Option<Shapes> = self
            .inputs
            .iter()
            .map(|spec| {
                let hint = hints.iter().find(|h| h.name == spec.name)?;
                (hint.shape.len() == spec.shape.len()).then_some(())?;
                hint.shape
                    .iter()
                    .zip(&spec.shape)
                    .map(|(&h, &fixed)| {
                        let size = usize::try_from(h).ok()?;
                        fixed.is_none_or(|f| f == size).then_some(size)
                    })
                    .collect()
            })
            .collect();
        if let Some(shapes) = shapes {
            shape_plans.build(&self.plan, &shapes);
        }
        self
    }

    /// The plan for these input shapes, and whether it is the generic one.
    fn plan_for(&self, shapes: &[Vec<usize>]) -> (Arc<TypedRunnableModel>, bool) {
        match self.shapes.as_ref().and_then(|s| s.get(shapes)) {
            Some(plan) => (plan, false),
            None => (self.plan.clone(), true),
        }
    }
}

/// Applies `$m!(Variant, rust_type)` for every tensor datatype.
macro_rules! each_type {
    ($m:ident) => {
        $m!(Bool, bool; Uint8, u8; Uint16, u16; Uint32, u32; Uint64, u64; Int8, i8; Int16, i16;
            Int32, i32; Int64, i64; Fp16, half::f16; Fp32, f32; Fp64, f64)
    };
}

fn to_tract(runtime: &'static str, t: Tensor) -> Result<TValue, EngineError> {
    let shape = &t.shape;
    macro_rules! convert {
        ($($variant:ident, $ty:ty);*) => {
            match &t.data {
                $(TensorData::$variant(v) => TractTensor::from_shape(shape, v),)*
            }
        };
    }
    let tensor = each_type!(convert).map_err(|e| EngineError::Runtime {
        runtime,
        reason: format!("input {:?}: {e}", t.name),
    })?;
    Ok(tensor.into_tvalue())
}

fn from_tract(runtime: &'static str, name: &str, value: TValue) -> Result<Tensor, EngineError> {
    let tensor = value.into_tensor();
    let fail = |e: String| EngineError::Runtime {
        runtime,
        reason: format!("output {name:?}: {e}"),
    };
    let datatype = to_datatype(tensor.datum_type().unquantized()).ok_or_else(|| {
        fail(format!(
            "unsupported output datatype {:?}",
            tensor.datum_type()
        ))
    })?;
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

impl Engine for TractEngine {
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
        let shapes: Shapes = inputs.iter().map(|t| t.shape.clone()).collect();
        let (plan, generic) = self.plan_for(&shapes);
        let values = inputs
            .into_iter()
            .map(|t| to_tract(self.runtime, t))
            .collect::<Result<TVec<_>, _>>()?;
        let fail = |e: tract_onnx::prelude::TractError| EngineError::Runtime {
            runtime: self.runtime,
            reason: format!("{e:#}"),
        };
        let results = match &self.shapes {
            None => plan.run(values).map_err(fail)?,
            Some(shape_plans) if generic => {
                let started = Instant::now();
                let results = plan.run(values).map_err(fail)?;
                if shape_plans.ran_generic(&shapes, started.elapsed()) {
                    shape_plans.build(&self.plan, &shapes);
                }
                results
            }
            // A specialised plan that fails where the generic one works
            // is tract's mistake: the generic plan serves this shape again.
            Some(shape_plans) => match plan.run(values.clone()) {
                Ok(results) => results,
                Err(e) => {
                    let results = self.plan.run(values).map_err(fail)?;
                    tracing::warn!(?shapes, error = %brief(&format!("{e:#}")), "tract's specialised plan failed; the generic one serves this shape");
                    shape_plans.forget(&shapes);
                    results
                }
            },
        };
        results
            .into_iter()
            .zip(&self.outputs)
            .map(|(value, spec)| from_tract(self.runtime, &spec.name, value))
            .collect()
    }
}
