//! Helpers shared by the test modules.

use burn::optim::ModuleOptimizer;
use burn::optim::SgdConfig;
use burn::optim::momentum::MomentumConfig;
use burn::tensor::Device;

/// SGD with momentum 0.9 (no dampening), as the recipes train.
pub fn sgd() -> ModuleOptimizer {
    SgdConfig::new()
        .with_momentum(Some(MomentumConfig {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
        }))
        .init()
}

/// The CPU autodiff device.
pub fn device() -> Device {
    Device::flex().autodiff()
}

/// The largest element-wise difference of two equally long slices. NaN when either holds a NaN at
/// the same place or the difference is one (`f32::max` would drop it), so a `< tolerance`
/// check fails on NaN.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    kiln_multi::data_parallel::max_abs_diff(a, b)
}

#[test]
fn max_abs_diff_reports_nan_so_tolerance_checks_fail() {
    let diff = max_abs_diff(&[1.0, f32::NAN, 2.0], &[1.0, 0.0, 2.0]);
    assert!(diff.is_nan(), "{diff}");
    let all_nan = max_abs_diff(&[f32::NAN; 3], &[f32::NAN; 3]);
    assert!(all_nan.is_nan() && all_nan.partial_cmp(&1e-5).is_none());
    assert_eq!(max_abs_diff(&[1.0, -2.0], &[1.5, -2.0]), 0.5);
}
