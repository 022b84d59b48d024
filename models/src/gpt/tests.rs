use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::generate::draw;
use super::*;

fn tiny(tied: bool) -> GptConfig {
    GptConfig {
        vocab_size: 19,
        block_size: 8,
        layers: 2,
        heads: 2,
        embed: 12,
        tied_head: tied,
    }
}

/// Largest |a - b|, NaN when either holds a NaN.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| {
            if d.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn bad_shapes_are_refused_with_their_name() {
    let device = Device::flex();
    let error = GptConfig {
        heads: 5,
        ..tiny(true)
    }
    .init(&device, 1)
    .unwrap_err();
    assert!(
        error.to_string().contains("does not divide into 5 heads"),
        "{error}"
    );
    let error = GptConfig {
        layers: 0,
        ..tiny(true)
    }
    .validate()
    .unwrap_err();
    assert!(error.to_string().contains("layers"), "{error}");
}

#[test]
fn initialisation_follows_nanogpt() {
    let device = Device::flex();
    let config = GptConfig {
        embed: 64,
        heads: 4,
        vocab_size: 256,
        ..tiny(false)
    };
    let model = config.init(&device, 3).unwrap();
    let std = |v: &[f32]| {
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        (v.iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64)
            .sqrt()
    };
    let wte = values(model.transformer.wte.weight.val());
    assert!((std(&wte) - 0.02).abs() < 0.001, "wte std {}", std(&wte));
    let proj = values(model.transformer.h[1].mlp.c_proj.weight.val());
    let expected = 0.02 / (2.0f64 * 2.0).sqrt();
    assert!(
        (std(&proj) - expected).abs() < 0.0005,
        "c_proj std {}",
        std(&proj)
    );
    let bias = values(
        model.transformer.h[0]
            .attn
            .c_attn
            .bias
            .as_ref()
            .unwrap()
            .val(),
    );
    assert!(bias.iter().all(|&b| b == 0.0));
    assert_eq!(model.config(), config);
    // The same seed gives the same model; another seed another.
    let again = values(
        config
            .init(&device, 3)
            .unwrap()
            .transformer
            .wte
            .weight
            .val(),
    );
    assert_eq!(wte, again);
    let other = values(
        config
            .init(&device, 4)
            .unwrap()
            .transformer
            .wte
            .weight
            .val(),
    );
    assert_ne!(wte, other);
}

#[test]
fn a_cached_forward_equals_the_whole_sequence_at_once() {
    let device = Device::flex();
    for tied in [true, false] {
        let model = tiny(tied).init(&device, 11).unwrap();
        let tokens: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let whole = model.forward(Tensor::<2, Int>::from_data(
            TensorData::new(ids, [1, 8]),
            &device,
        ));
        let mut cache = KvCache::new(&model);
        let mut pieces = Vec::new();
        for chunk in [&tokens[0..3], &tokens[3..4], &tokens[4..8]] {
            pieces.push(model.forward_cached(chunk, &mut cache, &device));
        }
        assert_eq!(cache.len(), 8);
        let cached = values(Tensor::cat(pieces, 1));
        let diff = max_diff(&cached, &values(whole));
        assert!(diff < 1e-5, "tied {tied}: cached logits differ by {diff}");
    }
}

#[test]
fn the_cache_changes_no_token_also_past_the_block_size() {
    let device = Device::flex();
    let model = tiny(true).init(&device, 5).unwrap();
    for sampling in [
        Sampling {
            temperature: 0.0,
            top_k: None,
            seed: 1,
        },
        Sampling {
            temperature: 1.3,
            top_k: Some(7),
            seed: 2,
        },
    ] {
        let run = |cache| generate(&model, &[2, 7], 20, sampling, cache, &device, |_| {}).unwrap();
        let (cached, uncached) = (run(true), run(false));
        assert_eq!(cached.len(), 20);
        assert_eq!(cached, uncached, "{sampling:?}");
        assert!(cached.iter().all(|&t| t < 19));
    }
}

#[test]
fn bad_prompts_are_errors() {
    let device = Device::flex();
    let model = tiny(true).init(&device, 5).unwrap();
    let sampling = Sampling {
        temperature: 1.0,
        top_k: None,
        seed: 1,
    };
    let empty = generate(&model, &[], 3, sampling, true, &device, |_| {}).unwrap_err();
    assert!(empty.to_string().contains("empty"), "{empty}");
    let outside = generate(&model, &[19], 3, sampling, true, &device, |_| {}).unwrap_err();
    assert!(outside.to_string().contains("token 19"), "{outside}");
}

#[test]
fn draws_follow_temperature_and_top_k() {
    let logits = [0.5, 2.0, f32::NAN, 1.9, -3.0];
    let mut rng = StdRng::seed_from_u64(9);
    let greedy = Sampling {
        temperature: 0.0,
        top_k: None,
        seed: 0,
    };
    assert_eq!(draw(&logits, &greedy, &mut rng).unwrap(), 1);
    let top1 = Sampling {
        temperature: 5.0,
        top_k: Some(1),
        seed: 0,
    };
    assert_eq!(draw(&logits, &top1, &mut rng).unwrap(), 1);
    // Top-2 at temperature 1: tokens 1 and 3 only, in the ratio e^0.1 : 1.
    let top2 = Sampling {
        temperature: 1.0,
        top_k: Some(2),
        seed: 0,
    };
    let mut counts = [0usize; 5];
    for _ in 0..20_000 {
        counts[draw(&logits, &top2, &mut rng).unwrap() as usize] += 1;
    }
    assert_eq!(counts[0] + counts[2] + counts[4], 0, "{counts:?}");
    let share = counts[1] as f64 / 20_000.0;
    let expected = 0.1f64.exp() / (1.0 + 0.1f64.exp());
    assert!(
        (share - expected).abs() < 0.015,
        "share {share} vs {expected}"
    );
    let all_nan = draw(&[f32::NAN; 3], &top2, &mut rng).unwrap_err();
    assert!(all_nan.to_string().contains("NaN"), "{all_nan}");
}

#[test]
fn pipeline_stages_chained_give_the_whole_forward() {
    let device = Device::flex();
    for tied in [true, false] {
        let config = GptConfig {
            layers: 4,
            ..tiny(tied)
        };
        let model = config.init(&device, 21).unwrap();
        let ids: Vec<i64> = vec![4, 8, 15, 16, 2, 3, 0, 18];
        let whole = values(model.forward(Tensor::<2, Int>::from_data(
            TensorData::new(ids.clone(), [2, 4]),
            &device,
        )));
        for stages in [1, 2, 4] {
            let parts = model.pipeline_stages(stages).unwrap();
            let floats: Vec<f32> = ids.iter().map(|&i| i as f32).collect();
            let tokens = Tensor::<2>::from_data(TensorData::new(floats, [2, 4]), &device);
            let x = parts[0].forward_tokens(tokens);
            let logits = parts[1..].iter().fold(x, |x, p| p.forward_hidden(x));
            let diff = max_diff(&values(logits), &whole);
            assert!(diff < 1e-6, "tied {tied}, {stages} stages: {diff}");
        }
    }
    let error = tiny(true)
        .init(&device, 1)
        .unwrap()
        .pipeline_stages(3)
        .unwrap_err();
    assert!(
        error.to_string().contains("2 blocks do not split into 3"),
        "{error}"
    );
}
