//! Reading NumPy `.npy` files (optionally gzipped), for tests that compare evald's
//! intermediates with the arrays nnU-Net itself wrote. Only what those files use: version
//! 1/2 headers, little-endian `<f2`, `<f4`, `<f8`, `|u1`, C order.

use std::io::Read;
use std::path::Path;

/// An array's element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// `<f2` (IEEE half, raw bits kept).
    F16,
    /// `<f4`.
    F32,
    /// `<f8`.
    F64,
    /// `|u1`.
    U8,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
            Dtype::U8 => 1,
        }
    }
}

/// An array: its shape (C order), type and little-endian bytes.
#[derive(Debug, Clone)]
pub struct Npy {
    /// Shape, slowest axis first.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: Dtype,
    /// `shape.product() * size` bytes.
    pub bytes: Vec<u8>,
}

impl Npy {
    /// The values as f32 (F16 and F64 converted exactly / rounded).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F16 => self
                .to_f16_bits()
                .into_iter()
                .map(|b| half::f16::from_bits(b).to_f32())
                .collect(),
            Dtype::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F64 => self
                .bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            Dtype::U8 => self.bytes.iter().map(|&b| f32::from(b)).collect(),
        }
    }

    /// The raw bits of an F16 array (empty for other types).
    pub fn to_f16_bits(&self) -> Vec<u16> {
        if self.dtype != Dtype::F16 {
            return Vec::new();
        }
        self.bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }
}

/// Read `path` (`.npy`, or `.npy.gz` by its name).
///
/// # Errors
/// A message naming the file for anything unreadable or outside what this reader knows.
pub fn read(path: &Path) -> Result<Npy, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("{}: gzip: {e}", path.display()))?;
        out
    } else {
        raw
    };
    parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse(b: &[u8]) -> Result<Npy, String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let (hlen, start) = match b[6] {
        1 => (usize::from(u16::from_le_bytes([b[8], b[9]])), 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!("npy version {v} not supported")),
    };
    let header = b
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated header")?;
    let field = |k: &str| -> Option<&str> {
        let i = header.find(&format!("'{k}':"))? + k.len() + 3;
        Some(header[i..].trim_start())
    };
    let descr = field("descr").ok_or("no descr")?;
    let dtype = if descr.starts_with("'<f2'") {
        Dtype::F16
    } else if descr.starts_with("'<f4'") {
        Dtype::F32
    } else if descr.starts_with("'<f8'") {
        Dtype::F64
    } else if descr.starts_with("'|u1'") {
        Dtype::U8
    } else {
        return Err(format!("dtype {descr:.8} not supported"));
    };
    if !field("fortran_order").is_some_and(|f| f.starts_with("False")) {
        return Err("only C order is supported".into());
    }
    let shape_s = field("shape").ok_or("no shape")?;
    let inner = shape_s
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("bad shape")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape {inner}")))
        .collect::<Result<Vec<_>, _>>()?;
    let n: usize = shape.iter().product();
    let data = &b[start + hlen..];
    if data.len() != n * dtype.size() {
        return Err(format!("{} data bytes for shape {shape:?}", data.len()));
    }
    Ok(Npy {
        shape,
        dtype,
        bytes: data.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nnunets_preprocessed_input_and_logits() {
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nnunet/tinyct/reference");
        let pre = read(&d.join("TinyCT_006_preprocessed_f32.npy.gz")).unwrap();
        assert_eq!(pre.dtype, Dtype::F32);
        assert_eq!(pre.shape.len(), 4);
        assert_eq!(pre.shape[0], 1);
        let lg = read(&d.join("fold0/intermediates/TinyCT_006_logits_f16.npy.gz")).unwrap();
        assert_eq!(lg.dtype, Dtype::F16);
        assert_eq!(lg.shape[0], 3);
        assert_eq!(lg.shape[1..], pre.shape[1..]);
        assert!(lg.to_f32().iter().all(|v| v.is_finite()));
    }
}
