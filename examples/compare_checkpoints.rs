//! Prints the largest |difference| between the parameters of two SimpleCNN checkpoints (or
//! run directories: their latest checkpoints), as JSON. `scripts/fault_table.py` uses it to
//! compare a run that survived faults with an uninterrupted one.
//!
//!   cargo run --release --example compare_checkpoints -- runs/a runs/b

use burn::tensor::Device;
use kiln::models::SimpleCnnConfig;
use kiln::multi::data_parallel::{flatten_params, max_abs_diff};
use kiln::trainer::checkpoint::{read_checkpoint, resolve_checkpoint};

fn params(path: &str) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    let file = resolve_checkpoint(std::path::Path::new(path))?;
    let checkpoint = read_checkpoint(&file)?;
    let model = SimpleCnnConfig::new().init(&Device::flex(), 0);
    Ok(flatten_params(&checkpoint.load_model(model, &file)?)?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    let [a, b] = paths.as_slice() else {
        return Err("usage: compare_checkpoints CHECKPOINT_OR_RUN CHECKPOINT_OR_RUN".into());
    };
    let (a, b) = (params(a)?, params(b)?);
    if a.len() != b.len() {
        return Err(format!("{} parameters against {}", a.len(), b.len()).into());
    }
    // NaN anywhere is reported as NaN, never hidden by max().
    let max = max_abs_diff(&a, &b);
    println!("{{\"parameters\":{},\"max_abs_diff\":{max}}}", a.len());
    Ok(())
}
