//! GPU inventory through cudarc, safe on machines without a CUDA driver.

/// What the daemon found at start-up.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuInventory {
    /// No CUDA driver library on this machine.
    NoDriver,
    /// The driver loaded but reported an error (no device, driver too old...).
    Unavailable(String),
    Devices(Vec<GpuDevice>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GpuDevice {
    pub ordinal: usize,
    pub name: String,
    pub total_memory: usize,
}

impl std::fmt::Display for GpuInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuInventory::NoDriver => f.write_str("no GPU (no CUDA driver installed)"),
            GpuInventory::Unavailable(why) => write!(f, "no usable GPU ({why})"),
            GpuInventory::Devices(d) if d.is_empty() => f.write_str("no GPU (the driver reports no device)"),
            GpuInventory::Devices(d) => {
                let names: Vec<String> =
                    d.iter().map(|g| format!("#{} {} ({} MiB)", g.ordinal, g.name, g.total_memory >> 20)).collect();
                write!(f, "{} GPU(s): {}", d.len(), names.join(", "))
            }
        }
    }
}

/// Lists the GPUs. Checks for the driver library first: creating a CUDA
/// context without one panics inside cudarc.
pub fn inventory() -> GpuInventory {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return GpuInventory::NoDriver;
    }
    let count = match cudarc::driver::CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        Err(e) => return GpuInventory::Unavailable(e.to_string()),
    };
    let mut devices = Vec::with_capacity(count);
    for ordinal in 0..count {
        match cudarc::driver::CudaContext::new(ordinal) {
            Ok(ctx) => devices.push(GpuDevice {
                ordinal,
                name: ctx.name().unwrap_or_else(|_| "unknown".into()),
                total_memory: ctx.total_mem().unwrap_or(0),
            }),
            Err(e) => return GpuInventory::Unavailable(e.to_string()),
        }
    }
    GpuInventory::Devices(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_never_panics_and_describes_itself() {
        let inv = inventory();
        let text = inv.to_string();
        match inv {
            GpuInventory::NoDriver => assert!(text.contains("no CUDA driver")),
            GpuInventory::Unavailable(_) => assert!(text.starts_with("no usable GPU")),
            GpuInventory::Devices(d) => {
                eprintln!("GPU test ran on: {text}");
                assert!(d.iter().all(|g| !g.name.is_empty()));
            }
        }
    }
}
