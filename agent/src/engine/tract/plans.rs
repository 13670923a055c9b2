//! The plans of one tract model specialised to the input shapes it
//! serves (see the parent module for why): when a shape gets its own plan
//! (rent-or-buy), which plans and shapes are kept (the 4 plans and 16
//! shapes last used), and the race that decides whether a plan is faster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tract_onnx::prelude::{
    IntoRunnable, IntoTValue, Symbol, TDim, TVec, Tensor as TractTensor, TractResult, TypedModel,
    TypedRunnableModel,
};

use super::{brief, Shapes};

/// Plans specialised to concrete input shapes, built from the decluttered
/// model with its dynamic input dimensions set to the served sizes.
///
/// A shape gets its own plan once the time it has spent on the generic
/// plan reaches what building a plan costs (as the last build took): the
/// rent-or-buy rule, which spends at most about twice what the best choice
/// in hindsight would have, whether a shape comes back a million times or
/// never again. The shapes declared for the model (its spec's
/// inputs, or its test vector's) get theirs at load. Plans are few and
/// kept least recently used first: each holds its own packed weights.
/// Keeping the decluttered model costs about one more copy of the weights
/// for the life of the engine.
pub(super) struct ShapePlans {
    model: TypedModel,
    /// For each input, the symbol each dimension stands for (`None`:
    /// fixed size).
    symbols: Vec<Vec<Option<Symbol>>>,
    cache: Mutex<ShapeCache>,
}

struct ShapeCache {
    /// Most recently used last.
    plans: Vec<(Shapes, Arc<TypedRunnableModel>)>,
    /// Shapes served by the generic plan, most recently used last.
    seen: Vec<SeenShape>,
    /// What the last plan took to build.
    build_cost: Duration,
}

struct SeenShape {
    shapes: Shapes,
    /// Time spent on the generic plan.
    generic: Duration,
    /// Its plan could not be built, failed or was no faster: the generic
    /// plan keeps serving it.
    stays_generic: bool,
}

/// Specialised plans kept per model.
const MAX_SHAPE_PLANS: usize = 4;
/// Shapes whose time on the generic plan is tracked.
const MAX_SEEN_SHAPES: usize = 16;

impl ShapePlans {
    /// `None` when `model` has no dynamic input dimension, or one that is
    /// an expression rather than a plain symbol (no single size to give).
    pub(super) fn new(model: TypedModel, build_cost: Duration) -> TractResult<Option<Self>> {
        let mut symbols = Vec::new();
        let mut dynamic = false;
        for i in 0..model.inputs.len() {
            let mut dims = Vec::new();
            for d in model.input_fact(i)?.shape.iter() {
                match d {
                    TDim::Val(_) => dims.push(None),
                    TDim::Sym(s) => {
                        dynamic = true;
                        dims.push(Some(s.clone()));
                    }
                    _ => return Ok(None),
                }
            }
            symbols.push(dims);
        }
        Ok(dynamic.then(|| Self {
            model,
            symbols,
            cache: Mutex::new(ShapeCache {
                plans: Vec::new(),
                seen: Vec::new(),
                build_cost,
            }),
        }))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ShapeCache> {
        // The cache stays consistent whatever panicked while it was held.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The specialised plan for `shapes`, if there is one.
    pub(super) fn get(&self, shapes: &[Vec<usize>]) -> Option<Arc<TypedRunnableModel>> {
        let mut cache = self.cache();
        let at = cache.plans.iter().position(|(s, _)| s == shapes)?;
        let entry = cache.plans.remove(at);
        let plan = entry.1.clone();
        cache.plans.push(entry);
        Some(plan)
    }

    /// Counts a run of `shapes` on the generic plan; true when its plan
    /// is now worth building.
    pub(super) fn ran_generic(&self, shapes: &[Vec<usize>], took: Duration) -> bool {
        let mut cache = self.cache();
        let mut seen = match cache.seen.iter().position(|s| s.shapes == shapes) {
            Some(at) => cache.seen.remove(at),
            None => SeenShape {
                shapes: shapes.to_vec(),
                generic: Duration::ZERO,
                stays_generic: false,
            },
        };
        seen.generic += took;
        let build = !seen.stays_generic && seen.generic >= cache.build_cost;
        cache.seen.push(seen);
        if cache.seen.len() > MAX_SEEN_SHAPES {
            cache.seen.remove(0);
        }
        build
    }

    /// Builds the plan for `shapes` and keeps it if it beats `generic` on
    /// them; otherwise, or when it cannot be built, the shape stays on the
    /// generic plan. Concrete shapes usually unlock faster kernels, but
    /// not always (tract's lazy im2col can lose to its eager one).
    pub(super) fn build(&self, generic: &Arc<TypedRunnableModel>, shapes: &[Vec<usize>]) {
        let started = Instant::now();
        let verdict = self.specialise(shapes).and_then(|plan| {
            let (specialised_time, generic_time) =
                race(&plan, generic, shapes).map_err(|e| format!("{e:#}"))?;
            Ok((plan, specialised_time, generic_time))
        });
        // The race is part of the price of a plan.
        let took = started.elapsed();
        let mut cache = self.cache();
        cache.build_cost = took;
        match verdict {
            Ok((plan, specialised_time, generic_time)) if specialised_time < generic_time => {
                cache.seen.retain(|s| s.shapes != shapes);
                // Another caller may have built the same shape meanwhile.
                cache.plans.retain(|(s, _)| s != shapes);
                cache.plans.push((shapes.to_vec(), plan));
                if cache.plans.len() > MAX_SHAPE_PLANS {
                    cache.plans.remove(0);
                }
                tracing::debug!(
                    ?shapes,
                    build_ms = took.as_millis(),
                    ?specialised_time,
                    ?generic_time,
                    "tract plan specialised"
                );
            }
            Ok((_, specialised_time, generic_time)) => {
                tracing::debug!(
                    ?shapes,
                    ?specialised_time,
                    ?generic_time,
                    "tract's specialised plan is no faster; the generic one serves this shape"
                );
                stay_generic(&mut cache, shapes);
            }
            Err(e) => {
                tracing::debug!(?shapes, error = %brief(&e), "tract cannot specialise the plan; the generic one serves this shape");
                stay_generic(&mut cache, shapes);
            }
        }
    }

    /// Drops the plan for `shapes` and keeps them on the generic plan.
    pub(super) fn forget(&self, shapes: &[Vec<usize>]) {
        let mut cache = self.cache();
        cache.plans.retain(|(s, _)| s != shapes);
        stay_generic(&mut cache, shapes);
    }

    /// The plan for `shapes`, or why there is none.
    fn specialise(&self, shapes: &[Vec<usize>]) -> Result<Arc<TypedRunnableModel>, String> {
        let mut values: HashMap<Symbol, TDim> = HashMap::new();
        for (dims, shape) in self.symbols.iter().zip(shapes) {
            if dims.len() != shape.len() {
                return Err(format!(
                    "input rank {} where the model has {}",
                    shape.len(),
                    dims.len()
                ));
            }
            for (sym, &size) in dims.iter().zip(shape) {
                let Some(sym) = sym else { continue };
                let size = TDim::Val(size as i64);
                if values
                    .insert(sym.clone(), size.clone())
                    .is_some_and(|v| v != size)
                {
                    return Err(format!("{sym} is given two different sizes"));
                }
            }
        }
        self.model
            .set_symbols(&values)
            .and_then(TypedModel::into_optimized)
            .and_then(|model| model.into_runnable())
            .map_err(|e| format!("{e:#}"))
    }
}

/// Marks `shapes` as served by the generic plan for good.
fn stay_generic(cache: &mut ShapeCache, shapes: &[Vec<usize>]) {
    cache.seen.retain(|s| s.shapes != shapes);
    cache.seen.push(SeenShape {
        shapes: shapes.to_vec(),
        generic: Duration::ZERO,
        stays_generic: true,
    });
    if cache.seen.len() > MAX_SEEN_SHAPES {
        cache.seen.remove(0);
    }
}

/// The best of three alternated runs of each plan on zeros of `shapes`.
fn race(
    a: &Arc<TypedRunnableModel>,
    b: &Arc<TypedRunnableModel>,
    shapes: &[Vec<usize>],
) -> TractResult<(Duration, Duration)> {
    let model = b.model();
    let inputs = shapes
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            Ok(TractTensor::zero_dt(model.input_fact(i)?.datum_type, shape)?.into_tvalue())
        })
        .collect::<TractResult<TVec<_>>>()?;
    let time = |plan: &Arc<TypedRunnableModel>| -> TractResult<Duration> {
        let started = Instant::now();
        plan.run(inputs.clone())?;
        Ok(started.elapsed())
    };
    let (mut best_a, mut best_b) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        best_a = best_a.min(time(a)?);
        best_b = best_b.min(time(b)?);
    }
    Ok((best_a, best_b))
}

#[cfg(test)]
mod tests {
    use edgefleet_shared::TensorSpec;

    use super::super::{from_tract, to_tract, TractEngine, TRACT_ONNX};
    use super::*;
    use crate::engine::Engine;
    use crate::tensor::{Tensor, TensorData};

    fn digits() -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/digits/digits_fp32.onnx");
        std::fs::read(path).unwrap()
    }

    fn batch(n: usize) -> Tensor {
        Tensor {
            name: "input".into(),
            shape: vec![n, 64],
            data: TensorData::Fp32((0..n * 64).map(|i| (i % 17) as f32).collect()),
        }
    }

    fn values(outputs: &[Tensor]) -> Vec<f64> {
        outputs.iter().flat_map(|t| t.data.to_f64()).collect()
    }

    #[test]
    fn a_specialised_plan_computes_what_the_generic_one_does() {
        let generic = TractEngine::load_onnx(&digits(), &[]).unwrap();
        assert_eq!(generic.inputs[0].shape, vec![None, Some(64)]);
        let shape_plans = generic.shapes.as_ref().unwrap();
        let specialised = shape_plans.specialise(&[vec![3, 64]]).unwrap();
        assert_eq!(
            specialised
                .model()
                .input_fact(0)
                .unwrap()
                .shape
                .as_concrete(),
            Some(&[3, 64][..])
        );
        let input = to_tract(TRACT_ONNX, batch(3)).unwrap();
        let run = |plan: &Arc<TypedRunnableModel>| {
            let out = plan.run(std::iter::once(input.clone()).collect()).unwrap();
            let out = out.into_iter().next().unwrap();
            from_tract(TRACT_ONNX, "out", out).unwrap().data.to_f64()
        };
        assert_eq!(run(&generic.plan), run(&specialised));
        let err = shape_plans.specialise(&[vec![3]]).err().unwrap();
        assert!(err.to_string().contains("rank"), "{err}");
    }

    #[test]
    fn hinted_shapes_serve_the_same_answers_and_others_still_run() {
        let hints = [TensorSpec {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![3, 64],
        }];
        let hinted = TractEngine::load_onnx(&digits(), &hints).unwrap();
        let plain = TractEngine::load_onnx(&digits(), &[]).unwrap();
        // Still dynamic: the hint adds a plan, it does not fix the interface.
        assert_eq!(hinted.inputs[0].shape, vec![None, Some(64)]);
        // The same answers up to rounding: a specialised plan may pick
        // other kernels (another summation order) than the generic one.
        for n in [3, 1, 5, 3] {
            for _ in 0..50 {
                let (a, b) = (
                    values(&hinted.run(vec![batch(n)]).unwrap()),
                    values(&plain.run(vec![batch(n)]).unwrap()),
                );
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-3), "{a:?} vs {b:?}");
                }
            }
        }
        let cache = hinted.shapes.as_ref().unwrap().cache();
        assert!(cache.plans.len() <= MAX_SHAPE_PLANS);
        assert!(cache.seen.len() <= MAX_SEEN_SHAPES);
    }
}
