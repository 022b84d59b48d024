//! Which device a run uses: `--device cpu|cuda|cuda:N|wgpu|wgpu:N`, checked before any tensor
//! is made.
//!
//! A [`DeviceSpec`] names the first device; a run of several ranks or pipeline stages takes
//! consecutive devices from there (`cuda:1` with 2 ranks is cuda:1 and cuda:2), like
//! torchrun's one GPU per local rank. On the CPU every rank shares the Flex device.
//!
//! Asking for CUDA never panics: a build without the `cuda` feature, a machine without the
//! NVIDIA driver, and an index past the last GPU are each a [`MultiError::Device`] saying what
//! to do, returned before Burn opens the device (Burn's CUDA runtime panics when the driver
//! is missing). The same holds for `wgpu` (Burn's wgpu backend: any GPU vendor through
//! Vulkan, Metal or DirectX, or Mesa's software Vulkan driver lavapipe where there is no GPU):
//! a build without the `wgpu` feature and an adapter index past the last are errors.

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
    /// The graphics adapter with this index in Burn's wgpu enumeration (`wgpu:N`; plain
    /// `wgpu` is `wgpu:0`): Burn's wgpu backend (CubeCL, WGSL shaders) on Vulkan, Metal or
    /// DirectX, whichever the machine has.
    Wgpu(usize),
    /// Every rank or pipeline stage on graphics adapter N, each with a logical device of its
    /// own (`wgpu:N:shared`): multi-device runs on a machine with one adapter, as torch's gloo
    /// lets ranks share one GPU. Slower than one device: for checking, not for speed.
    WgpuShared(usize),
}

impl DeviceSpec {
    /// Whether this is a CUDA device.
    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }

    /// Whether this is the CPU (Flex, where kiln's CPU kernels run).
    pub fn is_cpu(self) -> bool {
        matches!(self, DeviceSpec::Cpu)
    }

    /// The device `offset` places after this one: the device of local rank `offset` (or
    /// pipeline stage `offset`). On the CPU every offset is the CPU.
    pub fn nth(self, offset: usize) -> DeviceSpec {
        match self {
            DeviceSpec::Cpu => DeviceSpec::Cpu,
            DeviceSpec::Cuda(i) => DeviceSpec::Cuda(i + offset),
            DeviceSpec::Wgpu(i) => DeviceSpec::Wgpu(i + offset),
            DeviceSpec::WgpuShared(i) => DeviceSpec::WgpuShared(i),
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
            DeviceSpec::Cpu | DeviceSpec::Wgpu(_) | DeviceSpec::WgpuShared(_) => Ok(Vec::new()),
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
    /// repeated on the CPU, consecutive GPUs on CUDA, consecutive graphics adapters on wgpu,
    /// logical devices of one adapter on `wgpu:N:shared`.
    /// Checked first, so Burn never panics on a missing GPU.
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
            DeviceSpec::Wgpu(first) => {
                wgpu_devices(first, count).map_err(|reason| MultiError::Device {
                    device: self.to_string(),
                    reason,
                })
            }
            DeviceSpec::WgpuShared(adapter) => {
                shared_wgpu_devices(adapter, count).map_err(|reason| MultiError::Device {
                    device: self.to_string(),
                    reason,
                })
            }
        }
    }

    /// How an in-process group of `count` ranks starting on this device exchanges data:
    /// shared memory on the CPU (and, through host copies, on wgpu), NCCL between
    /// consecutive GPUs on CUDA.
    ///
    /// # Errors
    /// As [`cuda_ordinals`](Self::cuda_ordinals).
    pub fn transport(self, count: usize) -> Result<Transport> {
        Ok(match self {
            DeviceSpec::Cpu | DeviceSpec::Wgpu(_) | DeviceSpec::WgpuShared(_) => {
                Transport::SharedMemory
            }
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
            DeviceSpec::Wgpu(i) => write!(f, "wgpu:{i}"),
            DeviceSpec::WgpuShared(i) => write!(f, "wgpu:{i}:shared"),
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
            "wgpu" | "vulkan" => Ok(DeviceSpec::Wgpu(0)),
            other => {
                let (kind, index): (fn(usize) -> DeviceSpec, _) =
                    match (other.strip_prefix("cuda:"), other.strip_prefix("wgpu:")) {
                        (Some(index), _) => (DeviceSpec::Cuda, index),
                        (_, Some(rest)) => match rest.strip_suffix(":shared") {
                            Some(index) => (DeviceSpec::WgpuShared, index),
                            None => (DeviceSpec::Wgpu, rest),
                        },
                        _ => {
                            return Err(bad("expected cpu, cuda, cuda:N, wgpu, wgpu:N or \
                                        wgpu:N:shared (N the device index, from 0)"
                                .to_string()));
                        }
                    };
                index.parse().map(kind).map_err(|_| {
                    bad(format!(
                        "'{index}' is not a device index; write cuda:0, wgpu:1, wgpu:0:shared, ..."
                    ))
                })
            }
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

/// `count` consecutive wgpu adapters from index `first`, as Burn's wgpu devices.
///
/// # Errors
/// Why they cannot be used: this build has no `wgpu` feature, or the machine has too few
/// adapters (none: no driver; on Debian `apt install mesa-vulkan-drivers` gives Vulkan's
/// software one, lavapipe).
#[cfg(feature = "wgpu")]
fn wgpu_devices(first: usize, count: usize) -> std::result::Result<Vec<Device>, String> {
    use burn::tensor::DeviceType;
    let all: Vec<Device> = Device::enumerate(DeviceType::Wgpu).into_iter().collect();
    let last = first + count.max(1) - 1;
    if last >= all.len() {
        let have = match all.len() {
            0 => "no graphics adapter (install a Vulkan driver: on Debian, \
                  mesa-vulkan-drivers gives the software one, lavapipe)"
                .to_string(),
            1 => "one graphics adapter (wgpu:0)".to_string(),
            n => format!("{n} graphics adapters (wgpu:0 to wgpu:{})", n - 1),
        };
        let share = if count > 1 && first < all.len() {
            format!(" (wgpu:{first}:shared puts them all on one adapter)")
        } else {
            String::new()
        };
        return Err(format!(
            "{} device(s) from wgpu:{first} were asked for, but this machine has {have}{share}",
            count.max(1)
        ));
    }
    Ok(all[first..=last].to_vec())
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_devices(_first: usize, _count: usize) -> std::result::Result<Vec<Device>, String> {
    Err("this kiln was built without wgpu support; rebuild with \
         `cargo build --release --features wgpu`, or train with --device cpu"
        .to_string())
}

/// `count` logical devices on wgpu adapter `adapter`, checked to exist first.
#[cfg(feature = "wgpu")]
fn shared_wgpu_devices(adapter: usize, count: usize) -> std::result::Result<Vec<Device>, String> {
    let device = wgpu_devices(adapter, 1)?.remove(0);
    crate::wgpu_shared::shared_devices(adapter, &device, count)
}

#[cfg(not(feature = "wgpu"))]
fn shared_wgpu_devices(adapter: usize, count: usize) -> std::result::Result<Vec<Device>, String> {
    wgpu_devices(adapter, count)
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
        assert_eq!("wgpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Wgpu(0));
        assert_eq!("wgpu:2".parse::<DeviceSpec>().unwrap(), DeviceSpec::Wgpu(2));
        assert_eq!(DeviceSpec::Wgpu(1).to_string(), "wgpu:1");
        assert_eq!(DeviceSpec::Wgpu(1).nth(1), DeviceSpec::Wgpu(2));
        let shared = "wgpu:1:shared".parse::<DeviceSpec>().unwrap();
        assert_eq!(shared, DeviceSpec::WgpuShared(1));
        assert_eq!(shared.to_string(), "wgpu:1:shared");
        assert_eq!(shared.nth(3), shared, "every rank on the same adapter");
        for bad in [
            "cuda:x",
            "tpu",
            "cuda:-1",
            "",
            "wgpu:one",
            "wgpu:shared",
            "cuda:0:shared",
        ] {
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

    /// In a build without `wgpu`, asking for it is an error that says how to get it.
    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_in_a_cpu_build_is_a_clear_error() {
        let err = DeviceSpec::Wgpu(0).device().unwrap_err().to_string();
        assert!(err.starts_with("device wgpu:0: "), "{err}");
        assert!(err.contains("--features wgpu"), "{err}");
    }

    /// An adapter index past the last is an error naming what the machine has.
    #[test]
    fn wgpu_index_out_of_range_is_a_clear_error() {
        let err = DeviceSpec::Wgpu(1000).devices(2).unwrap_err().to_string();
        assert!(err.starts_with("device wgpu:1000: "), "{err}");
        let err = DeviceSpec::WgpuShared(1000)
            .devices(2)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("device wgpu:1000:shared: "), "{err}");
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
