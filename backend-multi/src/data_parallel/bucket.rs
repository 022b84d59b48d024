use std::collections::HashMap;

use burn::module::ParamId;

use crate::error::{MultiError, Result};

/// How gradients are grouped into flat buffers for all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// Size above which a bucket is closed (PyTorch's `bucket_cap_mb`, default 25 MiB).
    pub cap_bytes: usize,
    /// Cap of the first bucket, which holds the last-registered parameters (default 1 MiB, as
    /// PyTorch's `_DEFAULT_FIRST_BUCKET_BYTES`: a small first bucket is ready early in backward).
    pub first_bucket_bytes: usize,
}

impl Default for BucketConfig {
    fn default() -> Self {
        Self {
            cap_bytes: 25 * 1024 * 1024,
            first_bucket_bytes: 1024 * 1024,
        }
    }
}

impl BucketConfig {
    /// Checks that both caps are positive.
    ///
    /// # Errors
    /// [`MultiError::Config`] naming the zero cap.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("bucket cap", self.cap_bytes),
            ("first bucket cap", self.first_bucket_bytes),
        ] {
            if value == 0 {
                return Err(MultiError::Config {
                    field,
                    reason: "must be at least 1 byte".to_string(),
                });
            }
        }
        Ok(())
    }
}

/// A group of parameters whose gradients are flattened into one buffer and all-reduced in one
/// call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradientBucket {
    params: Vec<ParamId>,
    elements: usize,
}

impl GradientBucket {
    /// The parameters of this bucket, in buffer order (reverse registration order).
    pub fn params(&self) -> &[ParamId] {
        &self.params
    }

    /// Gradient elements in the bucket.
    pub fn elements(&self) -> usize {
        self.elements
    }

    /// Gradient bytes in the bucket (as `f32`).
    pub fn bytes(&self) -> usize {
        self.elements * size_of::<f32>()
    }
}

/// Where one parameter's gradient lives in the flattened buffers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placement {
    pub(crate) bucket: usize,
    /// Offset of the gradient in the bucket's buffer.
    pub(crate) offset: usize,
    pub(crate) elements: usize,
    /// Offset of the parameter's "had a gradient" flag, stored after the gradients.
    pub(crate) flag: usize,
}

/// The buckets of a model and each trainable parameter's place in them.
#[derive(Debug, Clone)]
pub(crate) struct BucketLayout {
    pub(crate) buckets: Vec<GradientBucket>,
    pub(crate) placements: HashMap<ParamId, Placement>,
}

impl BucketLayout {
    /// Assigns parameters, given in registration order with their element counts, to buckets
    /// in reverse registration order: backward produces the last layers' gradients first, so
    /// these buckets would be ready first. A bucket is closed once it reaches its cap, so a
    /// parameter larger than the cap gets a bucket of its own.
    pub(crate) fn plan(params: &[(ParamId, usize)], config: BucketConfig) -> Self {
        let mut buckets: Vec<GradientBucket> = Vec::new();
        let mut current = GradientBucket {
            params: Vec::new(),
            elements: 0,
        };
        for &(id, elements) in params.iter().rev() {
            current.params.push(id);
            current.elements += elements;
            let cap = if buckets.is_empty() {
                config.first_bucket_bytes
            } else {
                config.cap_bytes
            };
            if current.bytes() >= cap {
                buckets.push(std::mem::replace(
                    &mut current,
                    GradientBucket {
                        params: Vec::new(),
                        elements: 0,
                    },
                ));
            }
        }
        if !current.params.is_empty() {
            buckets.push(current);
        }
        let sizes: HashMap<ParamId, usize> = params.iter().copied().collect();
        let mut placements = HashMap::new();
        for (b, bucket) in buckets.iter().enumerate() {
            let mut offset = 0;
            for (k, id) in bucket.params.iter().enumerate() {
                let elements = sizes[id];
                placements.insert(
                    *id,
                    Placement {
                        bucket: b,
                        offset,
                        elements,
                        flag: bucket.elements + k,
                    },
                );
                offset += elements;
            }
        }
        Self {
            buckets,
            placements,
        }
    }

    /// Length of each bucket's buffer: its gradients, then one flag per parameter.
    pub(crate) fn buffer_len(&self, bucket: usize) -> usize {
        let b = &self.buckets[bucket];
        b.elements + b.params.len()
    }

    /// Every bucket's buffer, zeroed.
    pub(crate) fn zeroed_buffers(&self) -> Vec<Vec<f32>> {
        (0..self.buckets.len())
            .map(|b| vec![0.0; self.buffer_len(b)])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_reverse_registration_order_and_caps() {
        let ids: Vec<ParamId> = (0..5).map(|_| ParamId::new()).collect();
        // 4-byte elements: sizes 100, 50, 300, 10, 200 elements = 400, 200, 1200, 40, 800 bytes.
        let params: Vec<(ParamId, usize)> =
            ids.iter().copied().zip([100, 50, 300, 10, 200]).collect();
        let config = BucketConfig {
            cap_bytes: 1000,
            first_bucket_bytes: 500,
        };
        let layout = BucketLayout::plan(&params, config);
        let groups: Vec<Vec<ParamId>> = layout.buckets.iter().map(|b| b.params.clone()).collect();
        // First bucket closes at >= 500 bytes: [p4 (800)]; then >= 1000: [p3, p2] (1240);
        // then the rest: [p1, p0] (600).
        assert_eq!(
            groups,
            vec![vec![ids[4]], vec![ids[3], ids[2]], vec![ids[1], ids[0]]]
        );
        let p2 = layout.placements[&ids[2]];
        assert_eq!(
            (p2.bucket, p2.offset, p2.elements, p2.flag),
            (1, 10, 300, 311)
        );
        assert_eq!(layout.buffer_len(1), 312);
    }
}
