//! A mutation fuzzer for kiln's file readers, on stable Rust: seeded, replayable, with
//! every panic caught and kept as a finding, and the largest single allocation of each
//! input measured (through [`TrackingAllocator`], which the fuzzing binary installs).
//!
//! Each [`Target`] is a reader fed through its real entry point (a path on a scratch
//! directory, as a user's file would be): IDX images and labels, `.npy`, PyTorch `.pth`
//! (zip + pickle) and SafeTensors through `load_weights`, kiln checkpoints (the CRCs fixed up
//! after half of the mutations, so the parser behind them is reached), quantized SafeTensors,
//! PNG/JPEG images and CIFAR-10 batches. `benches/fuzz_readers.rs` runs it; CI runs a short
//! pass and `tests/data/fuzz/regressions/` replays every input that once failed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::Device;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

/// A global allocator that records, per thread, the largest single allocation since
/// [`reset_peak`]. Install it with `#[global_allocator]` in the fuzzing binary.
pub struct TrackingAllocator;

// SAFETY: every call is forwarded to `System` unchanged; the thread-local cell is `const`
// initialised and never allocates.
unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Larger than any input or model here: an allocation this big is a reader trusting a
/// header. The process is stopped with the input's path before the allocation is tried
/// (it would abort with no word of which input did it).
const ALLOCATION_LIMIT: usize = 1 << 32;

thread_local! {
    static CURRENT_INPUT: Cell<Option<&'static str>> = const { Cell::new(None) };
}

fn record(size: usize) {
    let _ = PEAK.try_with(|peak| peak.set(peak.get().max(size)));
    if size >= ALLOCATION_LIMIT {
        let input = CURRENT_INPUT.try_with(Cell::get).ok().flatten();
        let message = format!(
            "fuzz finding: an allocation of {size} bytes while reading a {} input (its run's seed \
             replays it)\n",
            input.unwrap_or("fuzzed")
        );
        // Writing to stderr, then stopping: the finding is the input.
        // SAFETY: writing a valid buffer to fd 2, then ending the process.
        unsafe {
            libc::write(2, message.as_ptr().cast(), message.len());
            libc::_exit(101);
        }
    }
}

/// Forgets the largest allocation seen on this thread.
pub fn reset_peak() {
    let _ = PEAK.try_with(|peak| peak.set(0));
}

/// The largest allocation on this thread since [`reset_peak`] (0 without
/// [`TrackingAllocator`]).
pub fn peak() -> usize {
    PEAK.try_with(Cell::get).unwrap_or(0)
}

/// The module the weight readers load into: `fc.weight` [3, 4] (PyTorch's layout) and
/// `fc.bias` [3], as in `tests/data/fuzz/make_seeds.py`.
#[derive(Module, Debug)]
pub struct Tiny {
    fc: Linear,
}

/// Always the same weights (not drawn from the device's generator), so that the seed files
/// built from it, and so a fuzzing run, replay exactly.
fn tiny() -> Tiny {
    let config = LinearConfig::new(4, 3).with_initializer(Initializer::Constant { value: 0.25 });
    Tiny {
        fc: config.init(&Device::flex()),
    }
}

/// A reader under test.
pub struct Target {
    /// Its name on the command line and in the table.
    pub name: &'static str,
    /// Valid inputs to start from.
    pub seeds: fn(&Path) -> Vec<Vec<u8>>,
    /// Reads one input (written under the scratch directory first); `Err` is a clean refusal.
    pub read: fn(&[u8], &Path) -> Result<(), String>,
    /// Makes a mutated input consistent where a checksum would stop every mutation early.
    pub fix_up: Option<fn(&mut [u8])>,
}

/// Every reader.
pub fn targets() -> Vec<Target> {
    vec![
        target("idx-images", seeds::idx_images, read::idx_images),
        target("idx-labels", seeds::idx_labels, read::idx_labels),
        target("npy", seeds::npy, read::npy),
        target("pth", seeds::pth, read::pth),
        target("safetensors", seeds::safetensors, read::safetensors),
        Target {
            fix_up: Some(seeds::fix_checkpoint_crcs),
            ..target("checkpoint", seeds::checkpoint, read::checkpoint)
        },
        target("quantized", seeds::quantized, read::quantized),
        target("image", seeds::images, read::image),
        target("cifar", seeds::cifar, read::cifar),
    ]
}

fn target(
    name: &'static str,
    seeds: fn(&Path) -> Vec<Vec<u8>>,
    read: fn(&[u8], &Path) -> Result<(), String>,
) -> Target {
    Target {
        name,
        seeds,
        read,
        fix_up: None,
    }
}

/// What fuzzing one target found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// The target.
    pub target: &'static str,
    /// Inputs tried.
    pub inputs: u64,
    /// Inputs read without an error.
    pub accepted: u64,
    /// Inputs that panicked, saved under the findings directory: (file, panic message).
    pub panics: Vec<(PathBuf, String)>,
    /// The slowest input's time.
    pub slowest: Duration,
    /// The largest single allocation while reading any input, in bytes.
    pub largest_allocation: usize,
    /// The largest allocation relative to the size of the input that made it (at least
    /// 64 KiB).
    pub largest_allocation_ratio: f64,
    /// Wall time.
    pub seconds: f64,
}

/// A small seeded generator (xorshift64*), so that a run replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four mutations of `input`: bit flips, interesting bytes and 32/64-bit values,
/// truncation, extension, and a copied or deleted run.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    const INTERESTING: [u64; 8] = [0, 1, 0x7f, 0x80, 0xff, 0xffff_ffff, 1 << 40, u64::MAX];
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len());
        match rng.below(7) {
            0 if !out.is_empty() => out[at] ^= 1 << rng.below(8),
            1 if !out.is_empty() => out[at] = INTERESTING[rng.below(INTERESTING.len())] as u8,
            2 => {
                let value = INTERESTING[rng.below(INTERESTING.len())];
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let bytes = value.to_le_bytes();
                let end = (at + width).min(out.len());
                out[at..end].copy_from_slice(&bytes[..end - at]);
            }
            3 => out.truncate(at),
            4 => out.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
            5 if !out.is_empty() => {
                let len = rng.below(out.len() - at).min(256);
                let run = out[at..at + len].to_vec();
                let to = rng.below(out.len());
                out.splice(to..to, run);
            }
            _ if !out.is_empty() => {
                let len = rng.below(out.len() - at).min(256);
                out.drain(at..at + len);
            }
            _ => out.push(rng.next() as u8),
        }
    }
    out
}

/// Fuzzes `target` with `iterations` inputs from `seed`, in `scratch` (a fresh directory);
/// an input that panics is copied into `findings`.
///
/// # Errors
/// I/O errors of the scratch and findings directories.
pub fn fuzz(
    target: &Target,
    iterations: u64,
    seed: u64,
    (scratch, findings): (&Path, &Path),
) -> std::io::Result<Outcome> {
    std::fs::create_dir_all(scratch)?;
    let seeds = (target.seeds)(scratch);
    let mut rng = Rng(seed.max(1) ^ 0x9e37_79b9_7f4a_7c15);
    let start = Instant::now();
    let mut outcome = Outcome {
        target: target.name,
        inputs: 0,
        accepted: 0,
        panics: Vec::new(),
        slowest: Duration::ZERO,
        largest_allocation: 0,
        largest_allocation_ratio: 0.0,
        seconds: 0.0,
    };
    CURRENT_INPUT.with(|c| c.set(Some(target.name)));
    for i in 0..iterations {
        let mut input = mutate(&mut rng, &seeds[i as usize % seeds.len()]);
        if let Some(fix_up) = target.fix_up.filter(|_| rng.below(2) == 0) {
            fix_up(&mut input);
        }
        let (result, took, allocated) = run_one(target, &input, scratch);
        outcome.inputs += 1;
        outcome.slowest = outcome.slowest.max(took);
        outcome.largest_allocation = outcome.largest_allocation.max(allocated);
        // Decoders keep fixed state (inflate tables: ~380 KB): measured against 64 KiB at
        // least, so that only growth with what a header claims stands out.
        let ratio = allocated as f64 / input.len().max(64 << 10) as f64;
        outcome.largest_allocation_ratio = outcome.largest_allocation_ratio.max(ratio);
        match result {
            Ok(Ok(())) => outcome.accepted += 1,
            Ok(Err(_)) => {}
            Err(message) => {
                std::fs::create_dir_all(findings)?;
                let file = findings.join(format!("{}-{seed}-{i}.bin", target.name));
                std::fs::write(&file, &input)?;
                outcome.panics.push((file, message));
            }
        }
    }
    CURRENT_INPUT.with(|c| c.set(None));
    outcome.seconds = start.elapsed().as_secs_f64();
    Ok(outcome)
}

/// Reads one input with its panics caught: (result or panic message, time, peak allocation).
pub fn run_one(
    target: &Target,
    input: &[u8],
    scratch: &Path,
) -> (Result<Result<(), String>, String>, Duration, usize) {
    reset_peak();
    let start = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| (target.read)(input, scratch)));
    let took = start.elapsed();
    let result = result.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into())
    });
    (result, took, peak())
}

mod seeds {
    use std::path::Path;

    use kiln_models::quant::{Granularity, QuantBits, QuantScheme, save_quantized};
    use kiln_trainer::checkpoint::{Checkpoint, TrainerState, read_checkpoint};
    use kiln_trainer::data::{NpyArray, write_npy_f32};

    use super::tiny;

    fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut out = magic.to_be_bytes().to_vec();
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let _ = encoder.write_all(bytes);
        encoder.finish().unwrap_or_default()
    }

    /// 3 images of 28 x 28 pixels, raw IDX.
    pub(super) fn raw_idx_images() -> Vec<u8> {
        let pixels: Vec<u8> = (0..3 * 28 * 28).map(|i| (i * 7 % 256) as u8).collect();
        idx(0x803, &[3, 28, 28], &pixels)
    }

    /// Their 3 labels, raw IDX.
    pub(super) fn raw_idx_labels() -> Vec<u8> {
        idx(0x801, &[3], &[7, 0, 9])
    }

    pub(super) fn idx_images(_: &Path) -> Vec<Vec<u8>> {
        let raw = raw_idx_images();
        vec![gzip(&raw), raw]
    }

    pub(super) fn idx_labels(_: &Path) -> Vec<Vec<u8>> {
        let raw = raw_idx_labels();
        vec![gzip(&raw), raw]
    }

    pub(super) fn npy(scratch: &Path) -> Vec<Vec<u8>> {
        let path = scratch.join("seed.npy");
        [vec![2, 3], vec![1, 1, 4, 4]]
            .into_iter()
            .filter_map(|shape: Vec<usize>| {
                let values = (0..shape.iter().product::<usize>())
                    .map(|v| v as f32)
                    .collect();
                write_npy_f32(&path, &NpyArray { shape, values }).ok()?;
                std::fs::read(&path).ok()
            })
            .collect()
    }

    fn fixture(name: &str) -> Vec<Vec<u8>> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/fuzz")
            .join(name);
        std::fs::read(path).into_iter().collect()
    }

    pub(super) fn pth(_: &Path) -> Vec<Vec<u8>> {
        fixture("tiny.pth")
    }

    pub(super) fn safetensors(_: &Path) -> Vec<Vec<u8>> {
        fixture("tiny.safetensors")
    }

    pub(super) fn checkpoint(scratch: &Path) -> Vec<Vec<u8>> {
        use burn::module::Module;
        let path = scratch.join("seed.ckpt");
        let model = tiny().into_record().into_bytes().map(|b| b.to_vec());
        let state = TrainerState {
            recipe: "fuzz".into(),
            model: "tiny".into(),
            quantization: None,
            options: Default::default(),
            epoch: 1,
            step: 3,
            config: Default::default(),
            history: Vec::new(),
            mid_epoch: None,
        };
        let checkpoint = Checkpoint {
            state,
            model: model.unwrap_or_default(),
            optimizer: b"KILN-TP-NO-OPTIMIZER-STATE".to_vec(),
        };
        let written = kiln_trainer::checkpoint::write_checkpoint_atomic(&path, &checkpoint);
        let read = written.and_then(|()| read_checkpoint(&path));
        read.ok()
            .and_then(|_| std::fs::read(&path).ok())
            .into_iter()
            .collect()
    }

    /// Recomputes every section's CRC-32 that the (mutated) layout still delimits.
    pub(super) fn fix_checkpoint_crcs(bytes: &mut [u8]) {
        let mut at = 16;
        while at + 2 <= bytes.len() {
            let name = u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
            let header = at + 2 + name;
            if header + 12 > bytes.len() {
                return;
            }
            let mut len = [0u8; 8];
            len.copy_from_slice(&bytes[header..header + 8]);
            let len = u64::from_le_bytes(len);
            let data = header + 12;
            let Some(end) = usize::try_from(len).ok().and_then(|l| data.checked_add(l)) else {
                return;
            };
            if end > bytes.len() {
                return;
            }
            let crc = crc32fast::hash(&bytes[data..end]).to_le_bytes();
            bytes[header + 8..header + 12].copy_from_slice(&crc);
            at = end;
        }
    }

    pub(super) fn quantized(scratch: &Path) -> Vec<Vec<u8>> {
        let path = scratch.join("seed.safetensors");
        [Granularity::Tensor, Granularity::Channel]
            .into_iter()
            .filter_map(|granularity| {
                let scheme = QuantScheme {
                    bits: QuantBits::Int8,
                    granularity,
                };
                save_quantized(&tiny(), "tiny", scheme, &path).ok()?;
                std::fs::read(&path).ok()
            })
            .collect()
    }

    pub(super) fn images(scratch: &Path) -> Vec<Vec<u8>> {
        let digit = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits/train/0/00002.png");
        let mut seeds: Vec<Vec<u8>> = std::fs::read(digit).into_iter().collect();
        let rgb = image::RgbImage::from_fn(12, 9, |x, y| image::Rgb([x as u8 * 20, y as u8, 99]));
        let jpeg = scratch.join("seed.jpg");
        if rgb.save(&jpeg).is_ok() {
            seeds.extend(std::fs::read(&jpeg));
        }
        seeds
    }

    pub(super) fn cifar(_: &Path) -> Vec<Vec<u8>> {
        let record = |label: u8| {
            let mut r = vec![label];
            r.extend((0..3072).map(|i| (i % 251) as u8));
            r
        };
        vec![[record(3), record(9)].concat()]
    }
}

mod read {
    use std::path::{Path, PathBuf};

    use kiln_trainer::checkpoint::read_checkpoint;
    use kiln_trainer::data::{
        Cifar10, CifarSplit, ImageDataset, MnistDataset, load_eval_image, read_npy_f32,
    };

    use super::tiny;

    fn write(scratch: &Path, name: &str, input: &[u8]) -> Result<PathBuf, String> {
        let path = scratch.join(name);
        std::fs::write(&path, input).map_err(|e| e.to_string())?;
        Ok(path)
    }

    pub(super) fn idx_images(input: &[u8], _: &Path) -> Result<(), String> {
        // The other file of the pair, valid (built per input: a few bytes, no compression).
        let labels = super::seeds::raw_idx_labels();
        let images = Path::new("images");
        MnistDataset::from_idx_bytes(images, input, Path::new("labels"), &labels)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub(super) fn idx_labels(input: &[u8], _: &Path) -> Result<(), String> {
        let images = super::seeds::raw_idx_images();
        MnistDataset::from_idx_bytes(Path::new("images"), &images, Path::new("labels"), input)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub(super) fn npy(input: &[u8], scratch: &Path) -> Result<(), String> {
        let path = write(scratch, "input.npy", input)?;
        read_npy_f32(&path).map(drop).map_err(|e| e.to_string())
    }

    pub(super) fn pth(input: &[u8], scratch: &Path) -> Result<(), String> {
        let path = write(scratch, "input.pth", input)?;
        kiln_models::load_weights(&mut tiny(), &path)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub(super) fn safetensors(input: &[u8], scratch: &Path) -> Result<(), String> {
        let path = write(scratch, "input.safetensors", input)?;
        kiln_models::load_weights(&mut tiny(), &path)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub(super) fn checkpoint(input: &[u8], scratch: &Path) -> Result<(), String> {
        let path = write(scratch, "input.ckpt", input)?;
        let checkpoint = read_checkpoint(&path).map_err(|e| e.to_string())?;
        checkpoint
            .load_model(tiny(), &path)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub(super) fn quantized(input: &[u8], scratch: &Path) -> Result<(), String> {
        let path = write(scratch, "input.safetensors", input)?;
        kiln_models::quant::load_quantized(&mut tiny(), &path)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub(super) fn image(input: &[u8], scratch: &Path) -> Result<(), String> {
        let path = write(scratch, "input.png", input)?;
        load_eval_image(&path, 28)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub(super) fn cifar(input: &[u8], scratch: &Path) -> Result<(), String> {
        write(scratch, "test_batch.bin", input)?;
        let data = Cifar10::open(scratch, CifarSplit::Test, None).map_err(|e| e.to_string())?;
        let mut pixels = vec![0.0; 3 * 32 * 32];
        for i in 0..data.len() {
            data.sample(i, &mut pixels);
        }
        Ok(())
    }
}
