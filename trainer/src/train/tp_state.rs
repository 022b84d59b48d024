//! A tensor-parallel rank's optimizer state in the whole model's layout, and back: what makes
//! a tensor-parallel checkpoint the same file as a single device's, so that it resumes on any
//! layout (one device, data parallel, another number of tensor-parallel ranks), and a
//! single device's resumes under tensor parallelism.
//!
//! Burn's `ModuleOptimizer` keeps its state per parameter id: tensors of the parameter's shape
//! (Adam's moments, SGD's velocity) and scalars (step counts, the rank), in a burnpack record
//! named `"{id}.{field}"`. The functions that split a model into a rank's part and gather it
//! back move any values laid out like the parameters, so each field travels as a *carrier*:
//! the model with every parameter's values replaced by that field (a scalar repeated over the
//! parameter's elements, a parameter without state marked in a presence carrier), split or
//! gathered like the model, and read back under the other form's parameter ids.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Bytes, DType, Tensor};
use burn_pack::{Reader, Scalar, Writer};

use crate::error::Result;

/// A parsed optimizer record: per parameter id, its state tensors and scalars by field.
#[derive(Default)]
pub(super) struct State {
    pub(super) tensors: BTreeMap<u64, BTreeMap<String, Vec<f32>>>,
    pub(super) scalars: BTreeMap<u64, BTreeMap<String, Scalar>>,
}

/// Why a state could not be moved (the caller names the checkpoint).
pub(super) type Failure = String;

/// The float parameters of `model` in visiting order: id and shape.
pub(super) fn float_params<M: Module>(model: &M) -> Vec<(ParamId, Vec<usize>)> {
    struct Collect(Vec<(ParamId, Vec<usize>)>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push((param.id, param.val().dims().to_vec()));
        }
    }
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    collect.0
}

/// `"{id}.{field}"` as `(id, field)`.
fn split_key(key: &str) -> std::result::Result<(u64, String), Failure> {
    key.split_once('.')
        .and_then(|(id, field)| Some((id.parse().ok()?, field.to_string())))
        .ok_or_else(|| format!("optimizer state entry `{key}` is not named by a parameter id"))
}

/// The state in a Burn optimizer record's bytes.
pub(super) fn parse(bytes: Vec<u8>) -> std::result::Result<State, Failure> {
    let unreadable = |e: burn_pack::Error| format!("its optimizer state is unreadable: {e}");
    let reader = Reader::from_bytes(Bytes::from_bytes_vec(bytes)).map_err(unreadable)?;
    let mut state = State::default();
    for (key, value) in reader.scalars() {
        let (id, field) = split_key(key)?;
        state.scalars.entry(id).or_default().insert(field, *value);
    }
    for tensor in reader.into_tensors().map_err(unreadable)? {
        let (name, dtype, _, _, bytes) = tensor.into_parts().map_err(unreadable)?;
        if dtype != DType::F32 {
            return Err(format!("optimizer state `{name}` is {dtype:?}, not f32"));
        }
        let (id, field) = split_key(&name)?;
        let values = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        state.tensors.entry(id).or_default().insert(field, values);
    }
    Ok(state)
}

/// The record of `state` for the parameters `params` (their shapes give the tensors'), as
/// Burn's `ModuleOptimizer` reads it.
pub(super) fn write(
    state: &State,
    params: &[(ParamId, Vec<usize>)],
) -> std::result::Result<Vec<u8>, Failure> {
    let mut tensors = Vec::new();
    for (id, shape) in params {
        for (field, values) in state.tensors.get(&id.val()).into_iter().flatten() {
            tensors.push(burn_pack::Tensor::new(
                format!("{}.{field}", id.val()),
                DType::F32,
                shape.clone(),
                Some(id.val()),
                Bytes::from_elems(values.clone()),
            ));
        }
    }
    let mut writer = Writer::new(tensors);
    for (id, fields) in &state.scalars {
        for (field, value) in fields {
            writer = writer.with_scalar(&format!("{id}.{field}"), *value);
        }
    }
    let bytes = writer
        .into_bytes()
        .map_err(|e| format!("cannot write the optimizer state: {e}"))?;
    Ok(bytes.to_vec())
}

/// `model` with each float parameter's values replaced by `fill(id, elements)`.
fn carrier<M: Module>(
    model: &M,
    params: &[(ParamId, Vec<usize>)],
    fill: impl Fn(u64, usize) -> Vec<f32>,
) -> Result<M> {
    let flat: Vec<f32> = params
        .iter()
        .flat_map(|(id, shape)| fill(id.val(), shape.iter().product()))
        .collect();
    Ok(kiln_multi::data_parallel::load_params(
        model.clone(),
        &flat,
    )?)
}

/// A moved carrier's values, one vector per parameter of `params` (its form's).
fn read_back<M: Module>(carrier: &M, params: &[(ParamId, Vec<usize>)]) -> Result<Vec<Vec<f32>>> {
    let flat = kiln_multi::data_parallel::flatten_params(carrier)?;
    let mut offset = 0;
    Ok(params
        .iter()
        .map(|(_, shape)| {
            let n: usize = shape.iter().product();
            offset += n;
            flat[offset - n..offset].to_vec()
        })
        .collect())
}

/// A scalar as an `f32` carrier value (exact for the integers an optimizer counts with).
fn scalar_value(value: Scalar) -> std::result::Result<f32, Failure> {
    let exact = |v: f64| {
        (v.abs() < f64::from(1u32 << 24) && v.fract() == 0.0)
            .then_some(v as f32)
            .ok_or_else(|| format!("optimizer scalar {value:?} does not split exactly"))
    };
    match value {
        Scalar::Int(v) => exact(v as f64),
        Scalar::UInt(v) => exact(v as f64),
        Scalar::Bool(v) => Ok(f32::from(u8::from(v))),
        Scalar::Float(_) => Err(format!("optimizer scalar {value:?} does not split exactly")),
    }
}

/// `value` back as a scalar of `like`'s kind.
fn scalar_like(like: Scalar, value: f32) -> Scalar {
    match like {
        Scalar::Int(_) => Scalar::Int(value as i64),
        Scalar::UInt(_) => Scalar::UInt(value as u64),
        Scalar::Bool(_) => Scalar::Bool(value != 0.0),
        Scalar::Float(_) => Scalar::Float(f64::from(value)),
    }
}

/// Moves `state` (keyed by `from`'s parameters) to the parameters `to` of another form of the
/// model: each carrier of `from` goes through `carry` (a split or a gather, which every rank
/// of the group calls in the same order).
fn convert<A: Module, B: Module>(
    state: &State,
    from: &A,
    to: &[(ParamId, Vec<usize>)],
    carry: &mut dyn FnMut(A) -> Result<B>,
) -> Result<std::result::Result<State, Failure>> {
    let from_params = float_params(from);
    let mut moved = |fill: &dyn Fn(u64, usize) -> Vec<f32>| -> Result<Vec<Vec<f32>>> {
        read_back(&carry(carrier(from, &from_params, fill)?)?, to)
    };
    let has_state = |id| state.tensors.contains_key(&id) || state.scalars.contains_key(&id);
    let present = moved(&|id, n| vec![f32::from(u8::from(has_state(id))); n])?;
    let kept = |i: usize| present[i].first() == Some(&1.0);
    let mut out = State::default();
    let fields: BTreeSet<&String> = state.tensors.values().flat_map(BTreeMap::keys).collect();
    for field in fields {
        let values = moved(&|id, n| {
            let own = state.tensors.get(&id).and_then(|f| f.get(field));
            own.filter(|v| v.len() == n)
                .cloned()
                .unwrap_or_else(|| vec![0.0; n])
        })?;
        for (i, ((id, _), values)) in to.iter().zip(values).enumerate() {
            if kept(i) {
                let entry = out.tensors.entry(id.val()).or_default();
                entry.insert(field.clone(), values);
            }
        }
    }
    let mut kinds: BTreeMap<&String, Scalar> = BTreeMap::new();
    for fields in state.scalars.values() {
        for (field, value) in fields {
            kinds.entry(field).or_insert(*value);
        }
    }
    for (field, like) in kinds {
        let mut values = BTreeMap::new();
        for (id, fields) in &state.scalars {
            if let Some(value) = fields.get(field) {
                match scalar_value(*value) {
                    Ok(v) => values.insert(*id, v),
                    Err(failure) => return Ok(Err(failure)),
                };
            }
        }
        let moved = moved(&|id, n| vec![values.get(&id).copied().unwrap_or(f32::NAN); n])?;
        for (i, ((id, _), values)) in to.iter().zip(moved).enumerate() {
            if let (true, Some(&v)) = (kept(i), values.first())
                && !v.is_nan()
            {
                let entry = out.scalars.entry(id.val()).or_default();
                entry.insert(field.clone(), scalar_like(like, v));
            }
        }
    }
    Ok(Ok(out))
}

/// A rank's optimizer record (`optimizer`, for its `part`) as the record of the whole model
/// `whole` (gathered from the parts), keyed by `whole`'s parameter ids: the file a single
/// device would have written. Every rank of the group calls it together (`gather` is
/// collective). The outer error is the group's; the inner one names what cannot move.
pub(super) fn part_to_whole<M: Module, P: Module>(
    part: &P,
    optimizer: Vec<u8>,
    whole: &M,
    gather: &mut dyn FnMut(P) -> Result<M>,
) -> Result<std::result::Result<Vec<u8>, Failure>> {
    move_state(part, optimizer, &float_params(whole), gather)
}

/// The whole model's optimizer record (`optimizer`, for `whole`) as the record of this rank's
/// `part` (split from `whole` by `split`), keyed by the part's parameter ids.
pub(super) fn whole_to_part<M: Module, P: Module>(
    whole: &M,
    optimizer: Vec<u8>,
    part: &P,
    split: &mut dyn FnMut(M) -> Result<P>,
) -> Result<std::result::Result<Vec<u8>, Failure>> {
    move_state(whole, optimizer, &float_params(part), split)
}

fn move_state<A: Module, B: Module>(
    from: &A,
    optimizer: Vec<u8>,
    to: &[(ParamId, Vec<usize>)],
    carry: &mut dyn FnMut(A) -> Result<B>,
) -> Result<std::result::Result<Vec<u8>, Failure>> {
    // A record that does not parse fails on every rank alike, before any collective.
    let state = match parse(optimizer) {
        Ok(state) => state,
        Err(failure) => return Ok(Err(failure)),
    };
    Ok(match convert(&state, from, to, carry)? {
        Ok(moved) => write(&moved, to),
        Err(failure) => Err(failure),
    })
}
