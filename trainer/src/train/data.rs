//! Where a run's batches come from: kiln's image data sets, or any Burn `Dataset` with a
//! `Batcher`.

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::Device;

use crate::data::{ImageBatch, ImageDataset, make_batch, make_training_batch};
use crate::error::{Result, TrainError};

/// The data of an image-classification run ([`Trainer::fit`](super::Trainer::fit)).
#[derive(Clone, Copy)]
pub struct TrainData<'a> {
    /// Training samples, reshuffled every epoch.
    pub train: &'a dyn ImageDataset,
    /// Test samples, evaluated in order after every epoch.
    pub test: &'a dyn ImageDataset,
}

/// The data of any run ([`Trainer::fit_model`](super::Trainer::fit_model)), through Burn's
/// data API: items of any type `I`, made into batches `B` by a Burn [`Batcher`].
pub struct Data<'a, I, B> {
    /// Training items, reshuffled every epoch (by kiln's distributed sampler, so every rank
    /// takes its own share).
    pub train: &'a dyn Dataset<I>,
    /// Evaluation items, evaluated in order after every epoch (split over the ranks).
    pub eval: &'a dyn Dataset<I>,
    /// Makes a batch of items on a device.
    pub batcher: &'a dyn Batcher<I, B>,
}

impl<I, B> Clone for Data<'_, I, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<I, B> Copy for Data<'_, I, B> {}

/// Batches of a run, by sample indices: what the epoch loop and the evaluation read.
pub(crate) trait Batches<B>: Sync {
    /// Training samples.
    fn train_len(&self) -> usize;
    /// Evaluation samples.
    fn eval_len(&self) -> usize;
    /// The training samples at `indices`, as `epoch` sees them (augmented, where the data
    /// augments).
    fn train_batch(&self, indices: &[usize], epoch: usize, device: &Device) -> Result<B>;
    /// The evaluation samples at `indices`.
    fn eval_batch(&self, indices: &[usize], device: &Device) -> Result<B>;
}

impl Batches<ImageBatch> for TrainData<'_> {
    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn eval_len(&self) -> usize {
        self.test.len()
    }

    fn train_batch(&self, indices: &[usize], epoch: usize, device: &Device) -> Result<ImageBatch> {
        Ok(make_training_batch(self.train, indices, epoch, device))
    }

    fn eval_batch(&self, indices: &[usize], device: &Device) -> Result<ImageBatch> {
        Ok(make_batch(self.test, indices, device))
    }
}

impl<I, B> Batches<B> for Data<'_, I, B> {
    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn eval_len(&self) -> usize {
        self.eval.len()
    }

    fn train_batch(&self, indices: &[usize], _epoch: usize, device: &Device) -> Result<B> {
        let items = self
            .train
            .get_many(indices.to_vec())
            .map_err(|e| TrainError::Dataset {
                split: "training",
                reason: e.to_string(),
            })?;
        Ok(self.batcher.batch(items, device))
    }

    fn eval_batch(&self, indices: &[usize], device: &Device) -> Result<B> {
        let items = self
            .eval
            .get_many(indices.to_vec())
            .map_err(|e| TrainError::Dataset {
                split: "evaluation",
                reason: e.to_string(),
            })?;
        Ok(self.batcher.batch(items, device))
    }
}
