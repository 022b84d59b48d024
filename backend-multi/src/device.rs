//! Which device a run uses: `--device cpu|cuda|cuda:N`, checked before any tensor is made.
//!
//! A [`DeviceSpec`] names the first device; a run of several ranks or pipeline stages takes
//! consecutive devices from there (`cuda:1` with 2 ranks is cuda:1 and cuda:2), like
//! torchrun's one GPU per local rank. On the CPU every rank shares the Flex device.
//!
//! Asking for CUDA never panics: a build without the `cuda` feature, a machine without the
//! NVIDIA driver, and an index past the last GPU are each a [`MultiError::Device`] saying what
//! to do, returned before Burn opens the device (Burn's CUDA runtime panics when the driver
//! is missing).

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::collective::Transport;
use crate::error::{MultiError, Result};

/// The device a run starts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// Burn's Flex CPU backend (all cores).
    #[default]
    Cpu,
    /// The CUDA GPU with this index (`cuda:N`; plain `cuda` is `cuda:0`).
    Cuda(usize),
}

impl DeviceSpec {
    /// Whether this is a CUDA device.
    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }

    /// The device `offset` places after this one: the device of local rank `offset` (or
    /// pipeline stage `offset`). On the CPU every offset is the CPU.
    pub fn nth(self, offset: usize) -> DeviceSpec {
        match self {
            DeviceSpec::Cpu => DeviceSpec::Cpu,
            DeviceSpec::Cuda(i) => DeviceSpec::Cuda(i + offset),
        }
    }

    /// The CUDA indices of `count` consecutive devices from this one (empty on the CPU),
    /// checked against the GPUs this machine has.
    ///
    /// # Errors
    /// [`MultiError::Device`] when CUDA is asked for and this build lacks the `cuda` feature,
    /// the driver is missing, or the machine has too few GPUs.
    pub fn cuda_ordinals(self, count: usize) -> Result<Vec<usize>> {
        match self {
            DeviceSpec::Cpu => Ok(Vec::new()),
            DeviceSpec::Cuda(first) => {
                let available = cuda_device_count().map_err(|reason| MultiError::Device {
                    device: self.to_string(),
                    reason,
                })?;
                let last = first + count.max(1) - 1;
                if last >= available {
                    let have = match available {
                        0 => "no CUDA device".to_string(),
                        1 => "one CUDA device (cuda:0)".to_string(),
                        n => format!("{n} CUDA devices (cuda:0 to cuda:{})", n - 1),
                    };
                    let wanted = if count > 1 {
                        format!("{count} devices from {self} (up to cuda:{last}) were asked for")
                    } else {
                        format!("{self} was asked for")
                    };
                    return Err(MultiError::Device {
                        device: self.to_string(),
                        reason: format!("{wanted}, but this machine has {have}"),
                    });
                }
                Ok((first..=last).collect())
            }
        }
    }

    /// The Burn devices of `count` ranks or stages starting at this one: the Flex device
    /// repeated on the CPU, consecutive GPUs on CUDA. Checked first, so Burn never panics on
    /// a missing GPU.
    ///
    /// # Errors
    /// As [`cuda_ordinals`](Self::cuda_ordinals).
    pub fn devices(self, count: usize) -> Result<Vec<Device>> {
        match self {
            DeviceSpec::Cpu => Ok(vec![Device::flex(); count]),
            DeviceSpec::Cuda(_) => {
                let ordinals = self.cuda_ordinals(count)?;
                Ok(ordinals.into_iter().map(cuda_device).collect())
            }
        }
    }

    /// How an in-process group of `count` ranks starting on this device exchanges data:
    /// shared memory on the CPU, NCCL between consecutive GPUs on CUDA.
    ///
    /// # Errors
    /// As [`cuda_ordinals`](Self::cuda_ordinals).
    pub fn transport(self, count: usize) -> Result<Transport> {
        Ok(match self {
            DeviceSpec::Cpu => Transport::SharedMemory,
            DeviceSpec::Cuda(_) => Transport::Nccl {
                ordinals: self.cuda_ordinals(count)?,
            },
        })
    }

    /// This device alone, checked.
    ///
    /// # Errors
    /// As [`cuda_ordinals`](Self::cuda_ordinals).
    pub fn device(self) -> Result<Device> {
        Ok(self
            .devices(1)?
            .pop()
            .expect("devices(1) returns one device"))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = MultiError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: String| MultiError::Device {
            device: s.to_string(),
            reason,
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(index) => index.parse().map(DeviceSpec::Cuda).map_err(|_| {
                    bad(format!(
                        "'{index}' is not a device index; write cuda:0, cuda:1, ..."
                    ))
                }),
                None => Err(bad(
                    "expected cpu, cuda or cuda:N (N the GPU index, from 0)".to_string(),
                )),
            },
        }
    }
}

/// The number of CUDA devices this machine has.
///
/// # Errors
/// Why CUDA cannot be used here: this build has no `cuda` feature, the NVIDIA driver
/// (libcuda) is not installed, or the driver failed to initialise.
pub fn cuda_device_count() -> std::result::Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to open the driver library with libloading.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(
                "the NVIDIA driver library (libcuda.so) is not installed on this \
                 machine, so it has no usable GPU; train with --device cpu"
                    .to_string(),
            );
        }
        cudarc::driver::CudaContext::device_count()
            .map(|n| usize::try_from(n).unwrap_or(0))
            .map_err(|e| format!("the CUDA driver failed to initialise: {e}"))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("this kiln was built without CUDA support; rebuild with \
             `cargo build --release --features cuda` (after `bash scripts/setup-cuda`), \
             or train with --device cpu"
            .to_string())
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Device {
    Device::cuda(ordinal)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Device {
    unreachable!("cuda_ordinals fails first in a build without the cuda feature")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("CUDA:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        assert_eq!(DeviceSpec::Cuda(1).nth(2), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cpu.nth(2), DeviceSpec::Cpu);
        for bad in ["cuda:x", "tpu", "cuda:-1", ""] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("cuda:"), "{bad}: {err}");
        }
    }

    #[test]
    fn cpu_devices_need_no_gpu() {
        assert_eq!(DeviceSpec::Cpu.devices(3).unwrap().len(), 3);
        assert_eq!(
            DeviceSpec::Cpu.cuda_ordinals(3).unwrap(),
            Vec::<usize>::new()
        );
    }

    /// In a build without `cuda`, asking for a GPU is an error that says how to get one.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_cpu_build_is_a_clear_error() {
        let err = DeviceSpec::Cuda(0).device().unwrap_err().to_string();
        assert!(err.starts_with("device cuda:0: "), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
    }

    /// On any machine (none has 1000 GPUs), an index past the last GPU is an error, not the
    /// panic Burn would give.
    #[test]
    fn cuda_index_out_of_range_is_a_clear_error() {
        let err = DeviceSpec::Cuda(1000).devices(2).unwrap_err().to_string();
        assert!(err.starts_with("device cuda:1000: "), "{err}");
        assert!(DeviceSpec::Cuda(1000).transport(2).is_err());
    }
}
