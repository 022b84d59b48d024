//! A ZeRO run's optimizer state as Burn's optimizer record, and back: its checkpoints hold the
//! file a single device's `ModuleOptimizer` writes (gathered from the shards), so that a run
//! sharded over N ranks resumes on M, without ZeRO, or under tensor parallelism (whose parts'
//! records move through [`tp_state`](super::tp_state) like any other).
//!
//! Burn records a parameter's state as `"{id}.{field}"`: Adam's and AdamW's
//! `AdaptiveMomentumState` as `momentum.moment_1`, `momentum.moment_2` and the step count
//! `momentum.time`; SGD's velocity as `momentum.velocity`; and `__rank`, the parameter's
//! number of dimensions.

use std::collections::BTreeMap;

use burn::module::{Module, ParamId};
use burn_pack::Scalar;
use kiln_multi::{FlatOptimizer, ParamState};

use super::tp_state::{Failure, State, float_params, parse, write};

/// Burn's field names of `optimizer`'s state: the first and second per-element values, and
/// the step count (Adam's).
struct Fields {
    first: &'static str,
    second: Option<&'static str>,
    time: Option<&'static str>,
}

const RANK: &str = "__rank";

fn fields(optimizer: FlatOptimizer) -> Fields {
    match optimizer {
        FlatOptimizer::SgdMomentum { .. } => Fields {
            first: "momentum.velocity",
            second: None,
            time: None,
        },
        FlatOptimizer::Adam { .. } | FlatOptimizer::AdamW { .. } => Fields {
            first: "momentum.moment_1",
            second: Some("momentum.moment_2"),
            time: Some("momentum.time"),
        },
    }
}

/// The record Burn's `ModuleOptimizer` would write for `model` with this state.
pub(super) fn to_record<M: Module>(
    model: &M,
    optimizer: FlatOptimizer,
    states: Vec<ParamState>,
) -> Result<Vec<u8>, Failure> {
    let params = float_params(model);
    let ranks: BTreeMap<u64, usize> = params.iter().map(|(id, s)| (id.val(), s.len())).collect();
    let names = fields(optimizer);
    let mut state = State::default();
    for s in states {
        let id = s.id.val();
        let Some(&rank) = ranks.get(&id) else {
            return Err(format!(
                "optimizer state of parameter {id}, not in the model"
            ));
        };
        let tensors = state.tensors.entry(id).or_default();
        tensors.insert(names.first.to_string(), s.first);
        if let Some(second) = names.second {
            tensors.insert(second.to_string(), s.second);
        }
        let scalars = state.scalars.entry(id).or_default();
        scalars.insert(RANK.to_string(), Scalar::from(rank));
        if let Some(time) = names.time {
            scalars.insert(time.to_string(), Scalar::from(s.steps));
        }
    }
    write(&state, &params)
}

/// The per-parameter state in Burn's record `bytes` (of this model, any optimizer's layout
/// it names), for [`ZeroOptimizer::load_state`](kiln_multi::ZeroOptimizer::load_state).
pub(super) fn from_record(
    bytes: Vec<u8>,
    optimizer: FlatOptimizer,
) -> Result<Vec<ParamState>, Failure> {
    let mut state = parse(bytes)?;
    let names = fields(optimizer);
    let mut out = Vec::new();
    for (id, mut tensors) in std::mem::take(&mut state.tensors) {
        let mut take = |field: &str| {
            tensors.remove(field).ok_or_else(|| {
                format!("the optimizer state of parameter {id} has no `{field}` ({optimizer:?})")
            })
        };
        let first = take(names.first)?;
        let second = names.second.map(&mut take).transpose()?.unwrap_or_default();
        if let Some(field) = tensors.keys().next() {
            return Err(format!(
                "the optimizer state of parameter {id} has `{field}`, which {optimizer:?} \
                 does not keep"
            ));
        }
        let steps = match names.time {
            None => 1,
            Some(field) => state
                .scalars
                .get(&id)
                .and_then(|s| s.get(field))
                .and_then(|&v| u32::try_from(v).ok())
                .ok_or_else(|| format!("parameter {id} has no step count `{field}`"))?,
        };
        out.push(ParamState {
            id: ParamId::from(id),
            steps,
            first,
            second,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor, TensorData};
    use kiln_multi::{
        CollectiveConfig, MultiError, WorldSize, ZeroConfig, ZeroOptimizer, ZeroStage,
        run_in_process,
    };

    use super::*;
    use crate::optim::OptimizerConfig;
    use kiln_multi::data_parallel::max_abs_diff;

    /// `unused` never gets a gradient, so it has no state anywhere.
    #[derive(Module, Debug)]
    struct Net {
        a: Linear,
        b: Linear,
        unused: Linear,
    }

    /// The gradients of step `step` on a seeded batch.
    fn grads(model: &Net, step: usize) -> GradientsParams {
        let device = model.a.weight.val().device();
        let values: Vec<f32> = (0..12)
            .map(|i| ((i * 7 + step * 13) % 11) as f32 / 5.0 - 1.0)
            .collect();
        let x = Tensor::<2>::from_data(TensorData::new(values, [4, 3]), &device);
        let loss = model
            .b
            .forward(model.a.forward(x).tanh())
            .powi_scalar(2)
            .mean();
        GradientsParams::from_grads(loss.backward(), model)
    }

    fn flat(model: &Net) -> Vec<f32> {
        kiln_multi::data_parallel::flatten_params(model).unwrap()
    }

    /// `steps` ZeRO steps (one rank) from `start`, optionally from Burn's record `state`:
    /// the model and its state as Burn's record.
    fn zero_steps(
        config: OptimizerConfig,
        start: &Net,
        state: Option<Vec<u8>>,
        steps: std::ops::Range<usize>,
    ) -> (Net, Vec<u8>) {
        let flat_optimizer = config.flat();
        let zero_config = ZeroConfig {
            stage: ZeroStage::One,
            optimizer: flat_optimizer,
        };
        run_in_process(WorldSize::ONE, CollectiveConfig::default(), |c| {
            let (mut model, mut zero) = ZeroOptimizer::new(start.clone(), c, zero_config)?;
            if let Some(bytes) = state.clone() {
                zero.load_state(&from_record(bytes, flat_optimizer).unwrap())?;
            }
            for step in steps.clone() {
                let g = grads(&model, step);
                model = zero.step(0.01, model, g)?;
            }
            let record = to_record(&model, flat_optimizer, zero.gather_state()?).unwrap();
            Ok::<_, MultiError>((model, record))
        })
        .unwrap()
        .remove(0)
    }

    /// `steps` steps of Burn's optimizer from `start` (and its record `state`).
    fn burn_steps(
        config: OptimizerConfig,
        start: &Net,
        state: Option<Vec<u8>>,
        steps: std::ops::Range<usize>,
    ) -> (Net, Vec<u8>) {
        let mut optimizer = config.build();
        if let Some(bytes) = state {
            optimizer = optimizer
                .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
                .unwrap();
        }
        let mut model = start.clone();
        for step in steps {
            let g = grads(&model, step);
            model = optimizer.step(0.01, model, g);
        }
        (model, optimizer.into_bytes().unwrap().to_vec())
    }

    #[test]
    fn a_zero_state_is_burns_record_and_continues_either_way() {
        let device = Device::flex().autodiff();
        let start = Net {
            a: LinearConfig::new(3, 5).init(&device),
            b: LinearConfig::new(5, 2).init(&device),
            unused: LinearConfig::new(2, 2).init(&device),
        };
        for config in [
            OptimizerConfig::adamw(0.1),
            OptimizerConfig::adam(),
            OptimizerConfig::sgd(0.9),
        ] {
            let (zero_model, zero_record) = zero_steps(config, &start, None, 0..2);
            let (burn_model, burn_record) = burn_steps(config, &start, None, 0..2);
            assert!(max_abs_diff(&flat(&zero_model), &flat(&burn_model)) < 1e-6);
            // The same entries as Burn's own record, with the same values.
            let (z, b) = (
                parse(zero_record.clone()).unwrap(),
                parse(burn_record.clone()).unwrap(),
            );
            assert_eq!(z.scalars, b.scalars, "{config:?}");
            assert_eq!(
                z.tensors.len(),
                4,
                "a and b have state, unused none ({config:?})"
            );
            for (id, fields) in &b.tensors {
                let keys = |f: &BTreeMap<String, Vec<f32>>| f.keys().cloned().collect::<Vec<_>>();
                assert_eq!(keys(&z.tensors[id]), keys(fields), "{config:?}");
                for (field, values) in fields {
                    assert!(
                        max_abs_diff(&z.tensors[id][field], values) < 1e-6,
                        "{field}"
                    );
                }
            }
            // ZeRO's record continues in Burn's optimizer, Burn's in ZeRO, as either would.
            let (burn_next, _) = burn_steps(config, &zero_model, Some(zero_record), 2..3);
            let (zero_next, _) = zero_steps(config, &burn_model, Some(burn_record), 2..3);
            let (reference, _) = burn_steps(config, &start, None, 0..3);
            assert!(
                max_abs_diff(&flat(&burn_next), &flat(&reference)) < 1e-6,
                "{config:?}"
            );
            assert!(
                max_abs_diff(&flat(&zero_next), &flat(&reference)) < 1e-6,
                "{config:?}"
            );
        }
    }

    #[test]
    fn a_record_of_another_optimizer_is_refused_by_field() {
        let device = Device::flex().autodiff();
        let start = Net {
            a: LinearConfig::new(3, 5).init(&device),
            b: LinearConfig::new(5, 2).init(&device),
            unused: LinearConfig::new(2, 2).init(&device),
        };
        let (_, sgd) = burn_steps(OptimizerConfig::sgd(0.9), &start, None, 0..1);
        let err = from_record(sgd, OptimizerConfig::adamw(0.1).flat()).unwrap_err();
        assert!(err.contains("momentum.moment_1"), "{err}");
    }
}
