//! `wgpu:N:shared`: every rank or pipeline stage on graphics adapter N, each with a logical
//! device of its own (its own queue, memory and CubeCL runtime), as torch's gloo lets ranks
//! share one GPU. It lets a machine with one adapter (a laptop GPU, or Mesa's software
//! lavapipe in CI) run kiln's multi-device paths on Burn's Cube runtime: data parallelism
//! through the host engines, pipeline stages handing activations from device to device.
//!
//! The first device is the adapter as Burn opens it (`wgpu:N`); the others are further
//! logical devices requested from the same adapter with the same features and limits, and
//! registered with Burn as existing setups. They are made once per process and adapter and
//! handed out again on later calls, since Burn cannot deregister a runtime.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use burn::backend::DispatchDevice;
use burn::backend::{CubeDevice, WgpuDeviceKind};
use burn::tensor::wgpu::{WgpuSetup, wgpu};
use burn::tensor::{Device, DeviceKind};

/// Opened adapters: the adapter's wgpu setup and the logical devices made on it so far.
static OPENED: Mutex<Option<HashMap<usize, Opened>>> = Mutex::new(None);

struct Opened {
    setup: WgpuSetup,
    devices: Vec<Device>,
}

/// `count` logical devices on `adapter` (the Burn device of `wgpu:index`).
///
/// # Errors
/// Why not: the adapter cannot be opened, refuses another logical device, or is a kind of
/// adapter Burn cannot name.
pub(crate) fn shared_devices(
    index: usize,
    adapter: &Device,
    count: usize,
) -> Result<Vec<Device>, String> {
    let mut opened = OPENED.lock().unwrap_or_else(PoisonError::into_inner);
    let opened = opened.get_or_insert_with(HashMap::new);
    let entry = match opened.entry(index) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(slot) => {
            let (first, setup) = Device::wgpu_options()
                .device_kind(device_kind(adapter)?)
                .init_with_setup()
                .map_err(|e| format!("cannot open the adapter: {e}"))?;
            slot.insert(Opened {
                setup,
                devices: vec![first],
            })
        }
    };
    while entry.devices.len() < count {
        let device = another_device(&entry.setup).map_err(|e| {
            format!(
                "the adapter refused logical device {} of {count}: {e}",
                entry.devices.len() + 1
            )
        })?;
        entry.devices.push(device);
    }
    Ok(entry.devices[..count.max(1)].to_vec())
}

/// A further logical device on the setup's adapter, with the features and limits the
/// first one was given, registered with Burn.
fn another_device(setup: &WgpuSetup) -> Result<Device, String> {
    let descriptor = wgpu::DeviceDescriptor {
        label: Some("kiln shared adapter"),
        required_features: setup.device.features(),
        required_limits: setup.device.limits(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::MemoryUsage,
        trace: wgpu::Trace::Off,
    };
    let (device, queue) =
        block_on(setup.adapter.request_device(&descriptor)).map_err(|e| e.to_string())?;
    let more = WgpuSetup {
        instance: setup.instance.clone(),
        adapter: setup.adapter.clone(),
        device,
        queue,
        backend: setup.backend,
    };
    Device::wgpu_options()
        .setup(more)
        .init()
        .map_err(|e| e.to_string())
}

/// Which adapter an enumerated wgpu device is, as Burn's selector.
fn device_kind(adapter: &Device) -> Result<DeviceKind, String> {
    let DispatchDevice::Cube(CubeDevice::Wgpu(device)) = adapter.as_dispatch().clone().inner()
    else {
        return Err(format!("{adapter:?} is not a wgpu adapter"));
    };
    Ok(match device.kind {
        WgpuDeviceKind::DiscreteGpu(i) => DeviceKind::DiscreteGpu(i),
        WgpuDeviceKind::IntegratedGpu(i) => DeviceKind::IntegratedGpu(i),
        WgpuDeviceKind::VirtualGpu(i) => DeviceKind::VirtualGpu(i),
        WgpuDeviceKind::Cpu => DeviceKind::Cpu,
        WgpuDeviceKind::DefaultDevice => DeviceKind::DefaultDevice,
        other => {
            return Err(format!(
                "this adapter ({other:?}) cannot be shared: Burn has no selector for it"
            ));
        }
    })
}

/// Runs a future that a native wgpu backend resolves at once (device requests).
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::yield_now();
    }
}
