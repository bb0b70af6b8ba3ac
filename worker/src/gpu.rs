//! GPU readings from NVML (libnvidia-ml, loaded at run time), sampled on a thread of their own so
//! no NVML call ever sits on the job path. No driver: one log line at start, no GPU fields in
//! heartbeats, no GPU metrics; the worker runs anyway.
//!
//! `cuda:N` is the N-th GPU *visible to CUDA*: where `CUDA_VISIBLE_DEVICES` (or the device
//! plugin's `NVIDIA_VISIBLE_DEVICES`) lists GPUs, NVML is asked for that entry (an index or a
//! `GPU-…`/`MIG-…` UUID), since NVML numbers every GPU on the host.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_core::protocol::GpuReading;
use nvml_wrapper::Nvml;
use tokio_util::sync::CancellationToken;

/// Which GPU NVML should read for a CUDA device index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NvmlTarget {
    Index(u32),
    Uuid(String),
}

/// Maps CUDA's device `index` to the GPU NVML knows, from the visible-devices variables
/// (`CUDA_VISIBLE_DEVICES` first, as CUDA itself does; then `NVIDIA_VISIBLE_DEVICES`).
pub fn nvml_target(
    index: u32,
    cuda_visible: Option<&str>,
    nvidia_visible: Option<&str>,
) -> Result<NvmlTarget, String> {
    let listed = match (cuda_visible, nvidia_visible) {
        (Some(list), _) => Some(("CUDA_VISIBLE_DEVICES", list)),
        // The container runtime hides the other GPUs from NVML too, but names still work.
        (None, Some(list)) if !matches!(list.trim(), "all" | "") => {
            Some(("NVIDIA_VISIBLE_DEVICES", list))
        }
        _ => None,
    };
    let Some((variable, list)) = listed else {
        return Ok(NvmlTarget::Index(index));
    };
    if matches!(list.trim(), "none" | "void" | "") {
        return Err(format!("{variable}={list:?} makes no GPU visible"));
    }
    let entry = list
        .split(',')
        .map(str::trim)
        .nth(index as usize)
        .ok_or_else(|| format!("cuda:{index} is not among {variable}={list:?}"))?;
    if entry.starts_with("GPU-") || entry.starts_with("MIG-") {
        Ok(NvmlTarget::Uuid(entry.to_string()))
    } else {
        entry
            .parse::<u32>()
            .map(NvmlTarget::Index)
            .map_err(|_| format!("{variable} entry `{entry}` is neither an index nor a UUID"))
    }
}

/// An NVML handle and the GPU to read.
pub struct Gpu {
    nvml: Nvml,
    target: NvmlTarget,
    /// The GPU's name and the driver version, read once.
    pub name: String,
    pub driver: String,
    /// NVML's index of the GPU (heartbeats report it).
    index: u32,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("target", &self.target)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens NVML for CUDA device `cuda_index`; `None` (logged once) where there is no driver or
    /// no such GPU.
    pub fn open(cuda_index: u32) -> Option<Self> {
        let cuda_visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let nvidia_visible = std::env::var("NVIDIA_VISIBLE_DEVICES").ok();
        let target = match nvml_target(
            cuda_index,
            cuda_visible.as_deref(),
            nvidia_visible.as_deref(),
        ) {
            Ok(target) => target,
            Err(why) => {
                tracing::info!(%why, "no GPU telemetry");
                return None;
            }
        };
        let nvml = match Nvml::init() {
            Ok(nvml) => nvml,
            Err(error) => {
                tracing::info!(%error, "NVML not available (no NVIDIA driver); no GPU telemetry");
                return None;
            }
        };
        let (name, index) = {
            let device = match &target {
                NvmlTarget::Index(index) => nvml.device_by_index(*index),
                NvmlTarget::Uuid(uuid) => nvml.device_by_uuid(uuid.as_str()),
            };
            match device {
                Ok(device) => (
                    device.name().unwrap_or_default(),
                    device.index().unwrap_or(cuda_index),
                ),
                Err(error) => {
                    tracing::info!(%error, ?target, "NVML has no such GPU; no GPU telemetry");
                    return None;
                }
            }
        };
        let driver = nvml.sys_driver_version().unwrap_or_default();
        tracing::info!(gpu = %name, driver = %driver, nvml_index = index, "GPU telemetry from NVML");
        Some(Self {
            nvml,
            target,
            name,
            driver,
            index,
        })
    }

    /// Reads utilisation and memory now (a few NVML calls: keep off the job path).
    pub fn read(&self) -> Option<GpuReading> {
        let device = match &self.target {
            NvmlTarget::Index(index) => self.nvml.device_by_index(*index),
            NvmlTarget::Uuid(uuid) => self.nvml.device_by_uuid(uuid.as_str()),
        }
        .ok()?;
        let utilization = device.utilization_rates().ok()?;
        let memory = device.memory_info().ok()?;
        Some(GpuReading {
            index: self.index,
            utilization: f64::from(utilization.gpu) / 100.0,
            memory_used_bytes: memory.used,
            memory_total_bytes: memory.total,
        })
    }

    /// Samples every `interval` on a thread of its own until `stop`; the latest reading is
    /// always at hand, and `on_reading` sees each one (metrics, a run's record).
    pub fn sample(
        self,
        interval: Duration,
        stop: CancellationToken,
        mut on_reading: impl FnMut(&GpuReading) + Send + 'static,
    ) -> std::io::Result<Latest> {
        let latest = Latest::default();
        let slot = latest.clone();
        std::thread::Builder::new()
            .name("ember-nvml".into())
            .spawn(move || {
                while !stop.is_cancelled() {
                    let reading = self.read();
                    if let Some(reading) = &reading {
                        on_reading(reading);
                    }
                    *slot.0.lock().unwrap_or_else(|e| e.into_inner()) = reading;
                    std::thread::sleep(interval);
                }
            })?;
        Ok(latest)
    }
}

/// A running sampler: its latest reading; dropping it stops the thread.
#[derive(Debug)]
pub struct Sampling {
    pub latest: Latest,
    pub _stop: tokio_util::sync::DropGuard,
}

/// The newest GPU reading, shared with the sampling thread.
#[derive(Debug, Clone, Default)]
pub struct Latest(Arc<Mutex<Option<GpuReading>>>);

impl Latest {
    pub fn get(&self) -> Option<GpuReading> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_indices_map_through_the_visible_devices() {
        let uuid = "GPU-8f6c1a2e-0000-4b1e-9d3c-123456789abc";
        type Row<'a> = (
            u32,
            Option<&'a str>,
            Option<&'a str>,
            Result<NvmlTarget, ()>,
        );
        let table: &[Row] = &[
            (0, None, None, Ok(NvmlTarget::Index(0))),
            (2, None, None, Ok(NvmlTarget::Index(2))),
            (0, Some("3,1"), None, Ok(NvmlTarget::Index(3))),
            (1, Some("3, 1"), None, Ok(NvmlTarget::Index(1))),
            (2, Some("3,1"), None, Err(())),
            (0, Some(""), None, Err(())),
            (0, Some("none"), None, Err(())),
            (0, Some("zero"), None, Err(())),
            (0, None, Some(uuid), Ok(NvmlTarget::Uuid(uuid.into()))),
            (0, None, Some("all"), Ok(NvmlTarget::Index(0))),
            (0, None, Some("void"), Err(())),
            // CUDA_VISIBLE_DEVICES wins, as in CUDA itself.
            (0, Some("1"), Some(uuid), Ok(NvmlTarget::Index(1))),
            (
                0,
                Some("MIG-4a1b2c3d-1111-2222-3333-444455556666"),
                None,
                Ok(NvmlTarget::Uuid(
                    "MIG-4a1b2c3d-1111-2222-3333-444455556666".into(),
                )),
            ),
        ];
        for (index, cuda, nvidia, want) in table {
            let got = nvml_target(*index, *cuda, *nvidia);
            match want {
                Ok(target) => assert_eq!(got.as_ref(), Ok(target), "{index} {cuda:?} {nvidia:?}"),
                Err(()) => assert!(got.is_err(), "{index} {cuda:?} {nvidia:?}: {got:?}"),
            }
        }
    }

    #[test]
    fn without_a_driver_there_is_no_gpu_and_no_panic() {
        // This machine kind has no NVIDIA driver; where one is present the GPU opens instead.
        if std::path::Path::new("/dev/nvidiactl").exists() {
            return;
        }
        assert!(Gpu::open(0).is_none());
    }
}
