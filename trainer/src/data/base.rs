use burn::tensor::{Device, Int, Tensor, TensorData};

/// A labelled image data set that can fill batches.
///
/// Implementations hold their samples in memory and apply their own preprocessing
/// (normalisation) in [`ImageDataset::sample`], so batching is the same for every format.
pub trait ImageDataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether the data set holds no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[channels, height, width]` of every image.
    fn image_shape(&self) -> [usize; 3];

    /// Writes the preprocessed pixels of sample `index` into `pixels` (length
    /// `channels * height * width`, row-major) and returns its class label.
    fn sample(&self, index: usize, pixels: &mut [f32]) -> usize;

    /// Sample `index` as training in `epoch` sees it: with the data set's random
    /// augmentation, drawn from its seed, `epoch` and `index` (so a resumed run sees the same
    /// images). The default has no augmentation: [`sample`](Self::sample).
    fn training_sample(&self, index: usize, epoch: usize, pixels: &mut [f32]) -> usize {
        let _ = epoch;
        self.sample(index, pixels)
    }
}

/// A batch of images `[batch, channels, height, width]` and their class labels `[batch]`.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// Preprocessed images.
    pub images: Tensor<4>,
    /// Class labels.
    pub targets: Tensor<1, Int>,
}

/// Assembles the samples at `indices` into one batch on `device`.
pub fn make_batch(data: &dyn ImageDataset, indices: &[usize], device: &Device) -> ImageBatch {
    assemble(data, indices, device, |index, slot| {
        data.sample(index, slot)
    })
}

/// Assembles the samples at `indices` as training in `epoch` sees them (augmented, if the
/// data set augments) into one batch on `device`.
pub fn make_training_batch(
    data: &dyn ImageDataset,
    indices: &[usize],
    epoch: usize,
    device: &Device,
) -> ImageBatch {
    assemble(data, indices, device, |index, slot| {
        data.training_sample(index, epoch, slot)
    })
}

fn assemble(
    data: &dyn ImageDataset,
    indices: &[usize],
    device: &Device,
    sample: impl Fn(usize, &mut [f32]) -> usize,
) -> ImageBatch {
    let [c, h, w] = data.image_shape();
    let per_image = c * h * w;
    let mut pixels = vec![0.0f32; indices.len() * per_image];
    let mut labels = Vec::with_capacity(indices.len());
    for (slot, &index) in pixels.chunks_exact_mut(per_image).zip(indices) {
        labels.push(sample(index, slot) as i64);
    }
    let n = indices.len();
    ImageBatch {
        images: Tensor::from_data(TensorData::new(pixels, [n, c, h, w]), device),
        targets: Tensor::from_data(TensorData::new(labels, [n]), device),
    }
}
