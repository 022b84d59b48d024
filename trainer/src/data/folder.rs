//! Image folders as torchvision's `ImageFolder` reads them: one sub-directory per class
//! (classes sorted by name, label = position), PNG or JPEG files inside.
//!
//! Every image is decoded once when the folder is opened (in parallel), converted to RGB and
//! resized so that its shorter side is `image_size * 256 / 224` (torchvision's evaluation
//! `Resize`), then kept in memory: a corrupt file is an error naming it before training starts,
//! never a failure mid-epoch, at the cost of holding the set at that resolution.
//! Samples then come out as `[3, image_size, image_size]`, ImageNet-normalised:
//! - evaluation: the centre crop (torchvision's `Resize` + `CenterCrop`);
//! - training ([`Augment::Standard`]): a random crop of 8 %-100 % of the area and 3/4-4/3
//!   aspect ratio resized to `image_size` (`RandomResizedCrop`), flipped left-right half of the
//!   time (`RandomHorizontalFlip`); drawn from (seed, epoch, index), so runs repeat exactly.

use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::{ImageReader, RgbImage};
use rayon::prelude::*;

use super::base::ImageDataset;
use crate::error::{Result, TrainError};

/// torchvision's ImageNet statistics, `Normalize(mean, std)`, RGB.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Training-time augmentation of an [`ImageFolder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Augment {
    /// The centre crop every time (as evaluation).
    None,
    /// Random resized crop and horizontal flip, seeded.
    Standard {
        /// Seed of the crops and flips.
        seed: u64,
    },
}

/// A folder of class sub-directories of images, decoded into memory.
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    images: Vec<RgbImage>,
    labels: Vec<usize>,
    image_size: usize,
    augment: Augment,
}

impl std::fmt::Debug for ImageFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageFolder")
            .field("root", &self.root)
            .field("classes", &self.classes)
            .field("images", &self.images.len())
            .field("image_size", &self.image_size)
            .finish()
    }
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| TrainError::io("list", dir, e))?;
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| TrainError::io("list", dir, e))?;
    paths.sort();
    Ok(paths)
}

impl ImageFolder {
    /// Opens `root` (`root/CLASS/*.png|jpg|jpeg`) for samples of `image_size` x `image_size`.
    ///
    /// # Errors
    /// [`TrainError::Data`] when `root` has no class directory, a class has no image, or an
    /// image does not decode (the error names the file); [`TrainError::Io`] when a directory
    /// cannot be listed.
    pub fn open(root: &Path, image_size: usize, augment: Augment) -> Result<Self> {
        if !root.is_dir() {
            return Err(TrainError::data(root, "no such directory"));
        }
        if image_size == 0 {
            return Err(TrainError::data(root, "image size must be at least 1"));
        }
        let mut classes = Vec::new();
        let mut files = Vec::new();
        for dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
            let label = classes.len();
            let images: Vec<PathBuf> = sorted_entries(&dir)?
                .into_iter()
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            if images.is_empty() {
                return Err(TrainError::data(
                    &dir,
                    "class directory holds no .png, .jpg or .jpeg file",
                ));
            }
            classes.push(
                dir.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            );
            files.extend(images.into_iter().map(|p| (p, label)));
        }
        if classes.is_empty() {
            return Err(TrainError::data(
                root,
                "holds no class directories: expected ROOT/CLASS/IMAGE.png (one directory per class)",
            ));
        }
        let short_side = (image_size * 256).div_ceil(224) as u32;
        let images = files
            .par_iter()
            .map(|(path, _)| load_resized(path, short_side))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            images,
            labels: files.iter().map(|(_, l)| *l).collect(),
            image_size,
            augment,
        })
    }

    /// Class names in label order (the sorted sub-directory names).
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The directory read.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes the `[3, s, s]` normalised crop `(x, y, w, h)` of image `index`, resized to
    /// `s` x `s` and optionally mirrored, into `pixels`.
    fn write_crop(&self, index: usize, crop: [u32; 4], flip: bool, pixels: &mut [f32]) {
        let image = &self.images[index];
        let s = self.image_size as u32;
        let [x, y, w, h] = crop;
        let view = imageops::crop_imm(image, x, y, w, h).to_image();
        let resized = if (w, h) == (s, s) {
            view
        } else {
            imageops::resize(&view, s, s, FilterType::Triangle)
        };
        let plane = (s * s) as usize;
        for (i, pixel) in resized.pixels().enumerate() {
            let (row, col) = (i / s as usize, i % s as usize);
            let col = if flip { s as usize - 1 - col } else { col };
            for c in 0..3 {
                pixels[c * plane + row * s as usize + col] =
                    (f32::from(pixel[c]) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            }
        }
    }

    fn center_crop(&self, index: usize) -> [u32; 4] {
        let image = &self.images[index];
        let s = (self.image_size as u32)
            .min(image.width())
            .min(image.height());
        [(image.width() - s) / 2, (image.height() - s) / 2, s, s]
    }
}

/// One image file as evaluation sees it: decoded to RGB, resized to a short side of
/// `image_size * 256 / 224`, centre-cropped to `image_size` and ImageNet-normalised;
/// `[3, image_size, image_size]` values.
///
/// # Errors
/// [`TrainError::Data`] naming the file when it cannot be read or decoded.
pub fn load_eval_image(path: &Path, image_size: usize) -> Result<Vec<f32>> {
    let short_side = (image_size * 256).div_ceil(224) as u32;
    let folder = ImageFolder {
        root: path.to_path_buf(),
        classes: Vec::new(),
        images: vec![load_resized(path, short_side)?],
        labels: vec![0],
        image_size,
        augment: Augment::None,
    };
    let mut pixels = vec![0.0; 3 * image_size * image_size];
    folder.sample(0, &mut pixels);
    Ok(pixels)
}

/// Whether `path` names a file [`ImageFolder`] reads (`.png`, `.jpg`, `.jpeg`).
pub fn is_image_file(path: &Path) -> bool {
    path.is_file() && is_image(path)
}

/// What a decoder may allocate for a file of `len` bytes: deflate (PNG) expands at most about
/// 1,032 times, JPEG far less, so a header claiming more pixels than that is refused before
/// its buffer is allocated; 16 MiB at least, 256 MiB at most (a 40-megapixel photo).
fn decode_limits(len: u64) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(len.saturating_mul(1100).clamp(16 << 20, 256 << 20));
    limits.max_image_width = Some(1 << 15);
    limits.max_image_height = Some(1 << 15);
    limits
}

/// Decodes `path` to RGB and resizes it so that its shorter side is `short_side`.
fn load_resized(path: &Path, short_side: u32) -> Result<RgbImage> {
    let bad = |reason: String| TrainError::data(path, reason);
    let len = std::fs::metadata(path)
        .map_err(|e| bad(e.to_string()))?
        .len();
    let mut reader = ImageReader::open(path)
        .map_err(|e| bad(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    reader.limits(decode_limits(len));
    let image = reader
        .decode()
        .map_err(|e| bad(format!("cannot decode: {e}")))?
        .to_rgb8();
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(bad("image is empty".into()));
    }
    let scale = f64::from(short_side) / f64::from(w.min(h));
    let (nw, nh) = (
        ((f64::from(w) * scale).round() as u32).max(short_side),
        ((f64::from(h) * scale).round() as u32).max(short_side),
    );
    Ok(imageops::resize(&image, nw, nh, FilterType::Triangle))
}

/// SplitMix64: a small, well-mixed generator for per-sample augmentation draws.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl ImageDataset for ImageFolder {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn image_shape(&self) -> [usize; 3] {
        [3, self.image_size, self.image_size]
    }

    fn sample(&self, index: usize, pixels: &mut [f32]) -> usize {
        self.write_crop(index, self.center_crop(index), false, pixels);
        self.labels[index]
    }

    fn training_sample(&self, index: usize, epoch: usize, pixels: &mut [f32]) -> usize {
        let Augment::Standard { seed } = self.augment else {
            return self.sample(index, pixels);
        };
        let mut rng = SplitMix(
            seed ^ (epoch as u64).wrapping_mul(0x2545_F491_4F6C_DD1D)
                ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let image = &self.images[index];
        let (width, height) = (f64::from(image.width()), f64::from(image.height()));
        let area = width * height;
        // torchvision's RandomResizedCrop: 10 tries, then the centre crop.
        let mut crop = self.center_crop(index);
        for _ in 0..10 {
            let target = area * (0.08 + rng.uniform() * (1.0 - 0.08));
            let log_ratio =
                (3.0f64 / 4.0).ln() + rng.uniform() * ((4.0f64 / 3.0).ln() - (3.0f64 / 4.0).ln());
            let ratio = log_ratio.exp();
            let w = (target * ratio).sqrt().round();
            let h = (target / ratio).sqrt().round();
            if w >= 1.0 && h >= 1.0 && w <= width && h <= height {
                let x = (rng.uniform() * (width - w + 1.0)).floor();
                let y = (rng.uniform() * (height - h + 1.0)).floor();
                crop = [x as u32, y as u32, w as u32, h as u32];
                break;
            }
        }
        let flip = rng.uniform() < 0.5;
        self.write_crop(index, crop, flip, pixels);
        self.labels[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, value: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(w, h, image::Rgb([value, value, value]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn classes_labels_shapes_and_normalisation() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("b_cat/1.png"), 40, 30, 255);
        write_png(&dir.path().join("a_dog/1.png"), 20, 20, 0);
        write_png(&dir.path().join("a_dog/2.PNG"), 50, 64, 0);
        std::fs::write(dir.path().join("a_dog/notes.txt"), "x").unwrap();
        let folder = ImageFolder::open(dir.path(), 16, Augment::Standard { seed: 1 }).unwrap();
        assert_eq!(folder.classes(), ["a_dog", "b_cat"]);
        assert_eq!(folder.len(), 3);
        assert_eq!(folder.image_shape(), [3, 16, 16]);
        let mut pixels = vec![0.0; 3 * 16 * 16];
        assert_eq!(folder.sample(2, &mut pixels), 1);
        // White: (1 - mean) / std per channel.
        for c in 0..3 {
            let expected = (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            assert!((pixels[c * 256] - expected).abs() < 1e-5);
        }
        // Augmented samples differ by epoch only through the crop of a uniform image: same
        // values, same label, and they repeat for the same (epoch, index).
        let mut a = vec![0.0; 3 * 16 * 16];
        let mut b = vec![0.0; 3 * 16 * 16];
        assert_eq!(folder.training_sample(0, 3, &mut a), 0);
        folder.training_sample(0, 3, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn bad_folders_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = ImageFolder::open(dir.path(), 8, Augment::None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no class directories"), "{err}");
        std::fs::create_dir_all(dir.path().join("empty")).unwrap();
        let err = ImageFolder::open(dir.path(), 8, Augment::None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty") && err.contains("no .png"), "{err}");
        std::fs::write(
            dir.path().join("empty/broken.png"),
            b"\x89PNG\r\n\x1a\nnot really",
        )
        .unwrap();
        let err = ImageFolder::open(dir.path(), 8, Augment::None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.png"), "{err}");
    }

    #[test]
    fn flips_and_crops_move_pixels() {
        let dir = tempfile::tempdir().unwrap();
        // Left half black, right half white.
        let mut image = RgbImage::new(32, 32);
        for (x, _, p) in image.enumerate_pixels_mut() {
            *p = image::Rgb(if x < 16 { [0; 3] } else { [255; 3] });
        }
        std::fs::create_dir_all(dir.path().join("c")).unwrap();
        image.save(dir.path().join("c/x.png")).unwrap();
        let folder = ImageFolder::open(dir.path(), 28, Augment::Standard { seed: 9 }).unwrap();
        let mut centre = vec![0.0; 3 * 28 * 28];
        folder.sample(0, &mut centre);
        assert!(
            centre[0] < 0.0 && centre[27] > 0.0,
            "left dark, right bright"
        );
        let mut flipped_seen = false;
        for epoch in 0..20 {
            let mut p = vec![0.0; 3 * 28 * 28];
            folder.training_sample(0, epoch, &mut p);
            flipped_seen |= p[0] > 0.0 && p[27] < 0.0;
        }
        assert!(flipped_seen, "some epoch flips the image");
    }
}
