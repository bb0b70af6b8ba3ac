//! GPU readings from NVML (libnvidia-ml, loaded at run time). No driver: one log line at start,
//! no GPU fields in heartbeats, no GPU metrics; the worker runs anyway.

use ember_core::protocol::GpuReading;
use nvml_wrapper::Nvml;

/// An NVML handle and the device index to read.
pub struct Gpu {
    nvml: Nvml,
    index: u32,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("index", &self.index).finish()
    }
}

impl Gpu {
    /// Opens NVML for device `index`; `None` (logged once) where there is no driver or device.
    pub fn open(index: u32) -> Option<Self> {
        match Nvml::init() {
            Ok(nvml) => match nvml.device_by_index(index) {
                Ok(_) => Some(Self { nvml, index }),
                Err(error) => {
                    tracing::info!(%error, index, "NVML has no such GPU; no GPU telemetry");
                    None
                }
            },
            Err(error) => {
                tracing::info!(%error, "NVML not available (no NVIDIA driver); no GPU telemetry");
                None
            }
        }
    }

    /// Reads utilisation and memory now.
    pub fn read(&self) -> Option<GpuReading> {
        let device = self.nvml.device_by_index(self.index).ok()?;
        let utilization = device.utilization_rates().ok()?;
        let memory = device.memory_info().ok()?;
        Some(GpuReading {
            index: self.index,
            utilization: f64::from(utilization.gpu) / 100.0,
            memory_used_bytes: memory.used,
            memory_total_bytes: memory.total,
        })
    }
}
