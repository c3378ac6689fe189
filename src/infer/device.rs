//! Devices: `cpu`, `cuda`, `cuda:N`.
//!
//! rustc links with `--as-needed`, which drops `libtorch_cuda.so` from the binary because
//! no CUDA symbol is referenced; libtorch then reports CUDA unavailable even on a GPU. We
//! `dlopen` `libtorch_cuda.so` from the folder of the `libtorch_cpu.so` actually loaded,
//! once, before the first CUDA query (measured to work on an H200 machine). On a CPU-only
//! machine the library or its CUDA dependencies are missing, the dlopen fails cleanly, and
//! asking for `cuda:N` is a clear error.

use std::path::PathBuf;
use std::sync::OnceLock;

use tch::Device;

/// The device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Not `cpu`, `cuda` or `cuda:N`.
    #[error("'{0}' is not a device: use \"cpu\" or \"cuda:N\"")]
    Name(String),
    /// CUDA asked for, not available.
    #[error("device {name}: CUDA is not available on this machine ({why}); use --device cpu or pool.devices = [\"cpu\"]")]
    NoCuda {
        /// The device asked for.
        name: String,
        /// Why (dlopen message or device count).
        why: String,
    },
}

static CUDA: OnceLock<Result<i64, String>> = OnceLock::new();

/// The folder of the `libtorch_cpu.so` this process loaded (from `/proc/self/maps`).
pub fn libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| PathBuf::from(p).parent().map(PathBuf::from))
}

/// libtorch version string (`2.11.0`), from the library in use.
pub fn libtorch_version() -> String {
    // libtorch does not export its version through tch; the wheel's version.py sits beside
    // the lib folder we link against.
    let lib = libtorch_dir();
    lib.and_then(|d| std::fs::read_to_string(d.parent()?.join("version.py")).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Load libtorch's CUDA backend (once) and return the number of CUDA devices.
///
/// # Errors
/// A message saying why CUDA is unavailable.
pub fn cuda_devices() -> Result<i64, String> {
    CUDA.get_or_init(|| {
        // No CUDA query may happen before the dlopen: libtorch caches its CUDA hooks on the
        // first one. libtorch_cpu.so is a DT_NEEDED of this binary, so it is mapped already.
        let dir = libtorch_dir().ok_or("libtorch_cpu.so not found in this process")?;
        let lib = dir.join("libtorch_cuda.so");
        if !lib.exists() {
            return Err(format!("{} does not exist", lib.display()));
        }
        // SAFETY: loading a shared library runs its initialisers; libtorch_cuda is the
        // companion of the libtorch_cpu already loaded, built to be loaded this way.
        match unsafe {
            libloading::os::unix::Library::open(Some(&lib), libc::RTLD_NOW | libc::RTLD_GLOBAL)
        } {
            Ok(handle) => {
                // Keep it loaded for the life of the process.
                std::mem::forget(handle);
            }
            Err(e) => return Err(format!("cannot load {}: {e}", lib.display())),
        }
        let n = tch::Cuda::device_count();
        if n > 0 {
            Ok(n)
        } else {
            Err("libtorch sees no CUDA device".into())
        }
    })
    .clone()
}

/// A device name as the config and the worker protocol write it: `cpu`, `cuda` (= the
/// first GPU) or `cuda:N`. The one grammar for device names; whether the device exists
/// is [`parse`]'s question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl DeviceName {
    /// Parse the spelling; `None` for anything else.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "cpu" => Some(DeviceName::Cpu),
            "cuda" => Some(DeviceName::Cuda(0)),
            _ => name
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceName::Cuda),
        }
    }

    /// Whether it is a GPU.
    pub fn is_gpu(self) -> bool {
        matches!(self, DeviceName::Cuda(_))
    }
}

/// Parse a device name, checking that CUDA devices exist.
///
/// # Errors
/// [`DeviceError::Name`] for a malformed name, [`DeviceError::NoCuda`] for a CUDA device
/// this machine does not have.
pub fn parse(name: &str) -> Result<Device, DeviceError> {
    let index = match DeviceName::parse(name) {
        Some(DeviceName::Cpu) => return Ok(Device::Cpu),
        Some(DeviceName::Cuda(i)) => i,
        None => return Err(DeviceError::Name(name.to_string())),
    };
    match cuda_devices() {
        Ok(n) if (index as i64) < n => Ok(Device::Cuda(index)),
        Ok(n) => Err(DeviceError::NoCuda {
            name: name.to_string(),
            why: format!("only {n} CUDA device(s)"),
        }),
        Err(why) => Err(DeviceError::NoCuda {
            name: name.to_string(),
            why,
        }),
    }
}

/// One line describing what libtorch sees, for logs and `evald status`.
pub fn describe() -> String {
    match cuda_devices() {
        Ok(n) => format!(
            "libtorch {}: {n} CUDA device(s), cuDNN {}",
            libtorch_version(),
            tch::utils::version_cudnn()
        ),
        Err(why) => format!("libtorch {}: CPU only ({why})", libtorch_version()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse("cpu").unwrap(), Device::Cpu);
        assert!(matches!(parse("gpu0"), Err(DeviceError::Name(_))));
        assert!(matches!(parse("cuda:x"), Err(DeviceError::Name(_))));
    }
}
