//! nnU-Net's `fold_N/checkpoint_final.pth`, read without Python: the `torch.save` zip
//! archive (entries stored uncompressed: `<prefix>/data.pkl`, the storages
//! `<prefix>/data/<key>`, little-endian), its pickle through the restricted
//! [`super::pickle`] reader, and from it what inference needs: the trainer, the
//! configuration it was trained for, the mirroring axes test-time augmentation may use,
//! and the network's float32 weights (`network_weights`, alias names included).
//!
//! The zip is parsed here (a few dozen lines; the `zip` crate is only a dev-dependency):
//! the central directory, ZIP64 records when present, each used entry's local header, and
//! its CRC-32. Every offset and size is checked against the file before it is used, and
//! the weights decoded are bounded by a multiple of the file's size, so a hostile file can
//! only be refused.
//!
//! nnunetv2 2.8.1: `inference/predict_from_raw_data.py:initialize_from_trained_model_folder`
//! (L68-142) reads `trainer_name`, `init_args['configuration']`,
//! `inference_allowed_mirroring_axes` (of the first fold) and `network_weights`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::pickle::{self, PickleError, StorageDtype, TensorRef, Value};

/// One weight tensor, contiguous (C order).
#[derive(Debug, Clone, PartialEq)]
pub struct Weight {
    /// Shape.
    pub shape: Vec<usize>,
    /// `shape.product()` values.
    pub data: Vec<f32>,
}

/// What inference needs from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// `trainer_name`.
    pub trainer_name: String,
    /// `inference_allowed_mirroring_axes`, spatial axes (0 = first after channels); empty
    /// when the checkpoint has none (`None`), i.e. no test-time mirroring.
    pub mirroring_axes: Vec<usize>,
    /// `init_args['configuration']`.
    pub configuration: Option<String>,
    /// `network_weights`, by state-dict name (alias names included, as saved).
    pub weights: BTreeMap<String, Weight>,
}

/// Why a checkpoint cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file cannot be read (missing, not a regular file, larger than
    /// [`crate::infer::MAX_MODEL_BYTES`]).
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    /// Not a zip archive as torch.save writes (central directory, headers).
    #[error("{path}: not a torch.save archive: {why}")]
    Zip {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// An archive entry is missing, compressed, out of bounds or corrupt.
    #[error("{path}: entry {entry}: {why}")]
    Entry {
        /// The file.
        path: PathBuf,
        /// Entry name.
        entry: String,
        /// What is wrong.
        why: String,
    },
    /// `data.pkl` was refused.
    #[error("{path}: {entry}: {source}")]
    Pickle {
        /// The file.
        path: PathBuf,
        /// The pickle's entry name.
        entry: String,
        /// Why.
        source: PickleError,
    },
    /// A top-level key is missing or of the wrong type.
    #[error("{path}: {key}: {why}")]
    Key {
        /// The file.
        path: PathBuf,
        /// The key (`network_weights`, `init_args.configuration`).
        key: String,
        /// What is wrong.
        why: String,
    },
    /// A weight cannot be read (dtype, bounds, storage).
    #[error("{path}: network_weights[{name:?}]: {why}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// State-dict name.
        name: String,
        /// What is wrong.
        why: String,
    },
}

impl From<CheckpointError> for crate::infer::InferError {
    fn from(e: CheckpointError) -> Self {
        let path = match e {
            CheckpointError::File(f) => return crate::infer::InferError::File(f),
            CheckpointError::Zip { ref path, .. }
            | CheckpointError::Entry { ref path, .. }
            | CheckpointError::Pickle { ref path, .. }
            | CheckpointError::Key { ref path, .. }
            | CheckpointError::Tensor { ref path, .. } => path.clone(),
        };
        load_error(path, e.to_string())
    }
}

/// A model that cannot be loaded, as [`crate::infer::InferError::Load`] (shared by this
/// module's, the network's and the predictor's conversions).
pub(crate) fn load_error(path: PathBuf, message: String) -> crate::infer::InferError {
    crate::infer::InferError::Load {
        path,
        format: crate::infer::ModelFormat::NnUnet,
        device: "cpu".into(),
        message,
    }
}

/// Read the checkpoint at `path`.
///
/// # Errors
/// [`CheckpointError`] naming the file, and the entry, key or tensor, for anything
/// unreadable, malformed, hostile or not float32.
pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = crate::files::read_bounded(path, crate::infer::MAX_MODEL_BYTES)?;
    from_bytes(&bytes, path)
}

/// Read a checkpoint from its bytes (read, and hashed, once by the caller from `path`,
/// which names it in errors).
///
/// # Errors
/// As [`read`].
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Checkpoint, CheckpointError> {
    let zip = Archive::open(bytes).map_err(|why| CheckpointError::Zip {
        path: path.into(),
        why,
    })?;
    let prefix = zip.prefix().ok_or_else(|| CheckpointError::Zip {
        path: path.into(),
        why: "no <name>/data.pkl entry".into(),
    })?;
    let entry = |name: &str| {
        zip.data(name)
            .and_then(|d| zip.check_crc(name, d).map(|()| d))
            .map_err(|why| CheckpointError::Entry {
                path: path.into(),
                entry: name.into(),
                why,
            })
    };
    if zip.has(&format!("{prefix}/byteorder")) {
        let order = entry(&format!("{prefix}/byteorder"))?;
        if order != b"little" {
            return Err(CheckpointError::Entry {
                path: path.into(),
                entry: format!("{prefix}/byteorder"),
                why: format!(
                    "{:?}: only little-endian checkpoints are read",
                    String::from_utf8_lossy(&order[..order.len().min(16)])
                ),
            });
        }
    }
    let pkl_name = format!("{prefix}/data.pkl");
    let root = pickle::parse(entry(&pkl_name)?).map_err(|source| CheckpointError::Pickle {
        path: path.into(),
        entry: pkl_name.clone(),
        source,
    })?;
    let key_err = |key: &str, why: String| CheckpointError::Key {
        path: path.into(),
        key: key.into(),
        why,
    };
    if !matches!(root, Value::Dict(_)) {
        return Err(key_err(
            "",
            format!("the checkpoint is a {}, not a dict", root.kind()),
        ));
    }
    let trainer_name = match root.get("trainer_name") {
        Some(Value::Str(s)) => s.clone(),
        Some(v) => return Err(key_err("trainer_name", format!("a {}", v.kind()))),
        None => return Err(key_err("trainer_name", "missing".into())),
    };
    let configuration = match root.get("init_args").map(|a| (a, a.get("configuration"))) {
        None | Some((_, None)) => None,
        Some((_, Some(Value::Str(s)))) => Some(s.clone()),
        Some((_, Some(v))) => {
            return Err(key_err(
                "init_args.configuration",
                format!("a {}, not a str", v.kind()),
            ))
        }
    };
    let mirroring_axes = match root.get("inference_allowed_mirroring_axes") {
        None | Some(Value::None) => Vec::new(),
        Some(v) => v
            .as_seq()
            .and_then(|s| {
                s.iter()
                    .map(|a| a.as_int().and_then(|i| usize::try_from(i).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .filter(|a| a.iter().all(|&x| x < 3))
            .ok_or_else(|| {
                key_err(
                    "inference_allowed_mirroring_axes",
                    "a tuple of axes 0..=2 expected".into(),
                )
            })?,
    };
    let Some(Value::Dict(items)) = root.get("network_weights") else {
        return Err(key_err(
            "network_weights",
            "missing or not a dict of tensors".into(),
        ));
    };

    // Aliases decode a storage more than once; a bound keeps a file whose thousand names
    // share one huge storage from exhausting memory (real checkpoints: below 2x).
    let mut budget = (bytes.len() as u64)
        .saturating_mul(8)
        .saturating_add(1 << 20);
    let mut checked = HashSet::new();
    let mut weights = BTreeMap::new();
    for (k, v) in items {
        let Value::Str(name) = k else {
            return Err(key_err(
                "network_weights",
                format!("a {} key, not a str", k.kind()),
            ));
        };
        let terr = |why: String| CheckpointError::Tensor {
            path: path.into(),
            name: name.clone(),
            why,
        };
        let Value::Tensor(t) = v else {
            return Err(terr(format!("a {}, not a tensor", v.kind())));
        };
        let storage_name = format!("{prefix}/data/{}", t.storage.key);
        let storage = zip
            .data(&storage_name)
            .map_err(|why| terr(format!("storage {storage_name}: {why}")))?;
        if checked.insert(t.storage.key.clone()) {
            zip.check_crc(&storage_name, storage)
                .map_err(|why| terr(format!("storage {storage_name}: {why}")))?;
        }
        let w = weight(t, storage).map_err(terr)?;
        budget = budget
            .checked_sub(w.data.len() as u64 * 4)
            .ok_or_else(|| terr("the weights decode to more than 8x the file's size".into()))?;
        weights.insert(name.clone(), w);
    }
    Ok(Checkpoint {
        trainer_name,
        mirroring_axes,
        configuration,
        weights,
    })
}

/// A tensor record's values, gathered from its storage's bytes.
fn weight(t: &TensorRef, storage: &[u8]) -> Result<Weight, String> {
    if t.storage.dtype != StorageDtype::F32 {
        return Err(format!(
            "{} (only float32 weights are read; nnU-Net saves float32)",
            t.storage.dtype.class_name()
        ));
    }
    let numel = usize::try_from(t.storage.numel).map_err(|_| "storage too large")?;
    let want = numel
        .checked_mul(4)
        .ok_or("storage too large".to_string())?;
    if storage.len() != want {
        return Err(format!(
            "storage has {} bytes, the record says {numel} float32 ({want} bytes)",
            storage.len()
        ));
    }
    let shape = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| "shape too large".to_string()))
        .collect::<Result<Vec<usize>, String>>()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape too large")?;
    let offset = usize::try_from(t.offset).map_err(|_| "offset too large")?;
    if n == 0 {
        return Ok(Weight {
            shape,
            data: Vec::new(),
        });
    }
    // The last element addressed must lie in the storage.
    let mut last = offset;
    for (&d, &s) in shape.iter().zip(&t.stride) {
        let s = usize::try_from(s).map_err(|_| "stride too large")?;
        last = (d - 1)
            .checked_mul(s)
            .and_then(|x| x.checked_add(last))
            .ok_or("view out of bounds")?;
    }
    if last >= numel {
        return Err(format!(
            "view (offset {offset}, shape {shape:?}, stride {:?}) reaches element {last} of a {numel}-element storage",
            t.stride
        ));
    }
    if n > numel {
        return Err(format!(
            "view of {n} elements over a {numel}-element storage (overlapping strides)"
        ));
    }
    let at = |i: usize| -> f32 {
        let b = i * 4;
        // In bounds: every index is <= last < numel, and storage.len() == numel * 4.
        f32::from_le_bytes([storage[b], storage[b + 1], storage[b + 2], storage[b + 3]])
    };
    let mut data = Vec::with_capacity(n);
    // C-order walk over the view; `idx` counts per axis, `pos` is the storage index. The
    // stride of a length-1 axis is never applied and may be anything: zeroed, every
    // `stride * shape` is at most `2 * last`, so the walk cannot overflow.
    let stride: Vec<usize> = t
        .stride
        .iter()
        .zip(&shape)
        .map(|(&s, &d)| if d == 1 { 0 } else { s as usize })
        .collect();
    let mut idx = vec![0usize; shape.len()];
    let mut pos = offset;
    for _ in 0..n {
        data.push(at(pos));
        for ax in (0..shape.len()).rev() {
            idx[ax] += 1;
            pos += stride[ax];
            if idx[ax] < shape[ax] {
                break;
            }
            pos -= stride[ax] * shape[ax];
            idx[ax] = 0;
        }
    }
    Ok(Weight { shape, data })
}

// ---------------------------------------------------------------------------------------
// The zip archive.

/// An entry in the central directory.
#[derive(Debug, Clone, Copy)]
struct CdEntry {
    method: u16,
    flags: u16,
    crc: u32,
    compressed: u64,
    size: u64,
    local: u64,
}

struct Archive<'a> {
    bytes: &'a [u8],
    entries: HashMap<String, CdEntry>,
    /// Names in central-directory order.
    order: Vec<String>,
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn slice(b: &[u8], at: u64, len: u64) -> Option<&[u8]> {
    let at = usize::try_from(at).ok()?;
    let end = at.checked_add(usize::try_from(len).ok()?)?;
    b.get(at..end)
}

impl<'a> Archive<'a> {
    fn open(bytes: &'a [u8]) -> Result<Self, String> {
        const EOCD: u32 = 0x0605_4b50;
        const EOCD64: u32 = 0x0606_4b50;
        const LOCATOR64: u32 = 0x0706_4b50;
        const CENTRAL: u32 = 0x0201_4b50;
        let short = || "truncated central directory".to_string();
        // The end record is the last 22 bytes plus a comment of up to 65535 bytes.
        let lowest = bytes.len().saturating_sub(22 + 0xffff);
        let eocd = (lowest..=bytes.len().saturating_sub(22))
            .rev()
            .find(|&i| le32(bytes, i) == Some(EOCD))
            .ok_or("no end of central directory record (not a zip file)")?;
        let mut count = u64::from(le16(bytes, eocd + 10).ok_or_else(short)?);
        let mut cd_size = u64::from(le32(bytes, eocd + 12).ok_or_else(short)?);
        let mut cd_at = u64::from(le32(bytes, eocd + 16).ok_or_else(short)?);
        if count == 0xffff || cd_size == 0xffff_ffff || cd_at == 0xffff_ffff {
            let loc = eocd.checked_sub(20).ok_or_else(short)?;
            if le32(bytes, loc) != Some(LOCATOR64) {
                return Err("ZIP64 end record locator missing".into());
            }
            let at = le64(bytes, loc + 8).ok_or_else(short)?;
            let at = usize::try_from(at).map_err(|_| short())?;
            if le32(bytes, at) != Some(EOCD64) {
                return Err("ZIP64 end record missing".into());
            }
            count = le64(bytes, at + 32).ok_or_else(short)?;
            cd_size = le64(bytes, at + 40).ok_or_else(short)?;
            cd_at = le64(bytes, at + 48).ok_or_else(short)?;
        }
        let cd = slice(bytes, cd_at, cd_size).ok_or("central directory out of bounds")?;
        // Each entry takes at least 46 bytes: a count larger than that is a lie.
        if count > cd.len() as u64 / 46 {
            return Err(format!(
                "{count} entries cannot fit a {}-byte central directory",
                cd.len()
            ));
        }
        let mut entries = HashMap::new();
        let mut order = Vec::new();
        let mut p = 0usize;
        for _ in 0..count {
            if le32(cd, p) != Some(CENTRAL) {
                return Err(format!(
                    "bad central directory entry at {}",
                    cd_at + p as u64
                ));
            }
            let f16 = |o| le16(cd, p + o).ok_or_else(short);
            let f32_ = |o| le32(cd, p + o).ok_or_else(short);
            let (flags, method) = (f16(8)?, f16(10)?);
            let crc = f32_(16)?;
            let mut compressed = u64::from(f32_(20)?);
            let mut size = u64::from(f32_(24)?);
            let (nlen, elen, clen) = (
                usize::from(f16(28)?),
                usize::from(f16(30)?),
                usize::from(f16(32)?),
            );
            let mut local = u64::from(f32_(42)?);
            let name = cd.get(p + 46..p + 46 + nlen).ok_or_else(short)?;
            let extra = cd
                .get(p + 46 + nlen..p + 46 + nlen + elen)
                .ok_or_else(short)?;
            if size == 0xffff_ffff || compressed == 0xffff_ffff || local == 0xffff_ffff {
                // ZIP64 extra field (id 1): the 0xffffffff fields, in this order.
                let mut e = 0;
                let mut z64 = None;
                while e + 4 <= extra.len() {
                    let (id, len) = (
                        le16(extra, e).unwrap_or(0),
                        usize::from(le16(extra, e + 2).unwrap_or(0)),
                    );
                    if id == 1 {
                        z64 = extra.get(e + 4..e + 4 + len);
                        break;
                    }
                    e += 4 + len;
                }
                let z = z64.ok_or("ZIP64 sizes missing")?;
                let mut q = 0;
                for field in [&mut size, &mut compressed, &mut local] {
                    if *field == 0xffff_ffff {
                        *field = le64(z, q).ok_or("ZIP64 sizes truncated")?;
                        q += 8;
                    }
                }
            }
            p += 46 + nlen + elen + clen;
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            let e = CdEntry {
                method,
                flags,
                crc,
                compressed,
                size,
                local,
            };
            if entries.insert(name.to_string(), e).is_none() {
                order.push(name.to_string());
            }
        }
        Ok(Archive {
            bytes,
            entries,
            order,
        })
    }

    /// The archive's record prefix: `<prefix>/data.pkl` (torch names it after the file it
    /// first saved to; a renamed file keeps it).
    fn prefix(&self) -> Option<String> {
        self.order.iter().find_map(|n| {
            n.strip_suffix("/data.pkl")
                .filter(|p| !p.is_empty() && !p.contains('/'))
                .map(str::to_string)
        })
    }

    fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// An entry's bytes (stored entries only, as torch.save writes them).
    fn data(&self, name: &str) -> Result<&'a [u8], String> {
        const LOCAL: u32 = 0x0403_4b50;
        let e = self.entries.get(name).ok_or("missing from the archive")?;
        if e.flags & 1 != 0 {
            return Err("encrypted".into());
        }
        if e.method != 0 || e.compressed != e.size {
            return Err(format!(
                "compressed (method {}); torch.save stores entries uncompressed",
                e.method
            ));
        }
        let at = usize::try_from(e.local).map_err(|_| "local header out of bounds")?;
        if le32(self.bytes, at) != Some(LOCAL) {
            return Err("local header missing".into());
        }
        let nlen = le16(self.bytes, at + 26).ok_or("local header truncated")?;
        let elen = le16(self.bytes, at + 28).ok_or("local header truncated")?;
        let start = e
            .local
            .checked_add(30 + u64::from(nlen) + u64::from(elen))
            .ok_or("local header out of bounds")?;
        slice(self.bytes, start, e.size).ok_or_else(|| {
            format!(
                "{} bytes at {start} run past the end of the file ({} bytes)",
                e.size,
                self.bytes.len()
            )
        })
    }

    fn check_crc(&self, name: &str, data: &[u8]) -> Result<(), String> {
        let want = self.entries.get(name).map_or(0, |e| e.crc);
        let mut crc = flate2::Crc::new();
        crc.update(data);
        if crc.sum() != want {
            return Err(format!(
                "CRC-32 {:08x}, the archive says {want:08x} (corrupt file)",
                crc.sum()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::io::Write;

    fn data(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/nnunet")
            .join(p)
    }

    const MODEL: &str = "tinyct/model/nnUNetTrainer__nnUNetPlansTiny__3d_fullres";

    fn json(p: &str) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(data(p)).unwrap()).unwrap()
    }

    #[test]
    fn reads_the_fixtures_checkpoints_as_torch_does() {
        // tinyct/checkpoint_reference.json: torch.load(weights_only=True) of the same files
        // (tests/data/nnunet/make_checkpoint_reference.py).
        let reference = json("tinyct/checkpoint_reference.json");
        for fold in ["fold_0", "fold_1"] {
            let r = &reference["folds"][fold];
            let ck = read(&data(&format!("{MODEL}/{fold}/checkpoint_final.pth"))).unwrap();
            assert_eq!(ck.trainer_name, r["trainer_name"].as_str().unwrap());
            assert_eq!(ck.configuration.as_deref(), r["configuration"].as_str());
            let axes: Vec<usize> = r["inference_allowed_mirroring_axes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(ck.mirroring_axes, axes);
            let names = r["network_weights"].as_object().unwrap();
            assert_eq!(
                ck.weights.keys().collect::<Vec<_>>(),
                names.keys().collect::<Vec<_>>()
            );
            for (name, w) in &ck.weights {
                let rw = &names[name];
                let shape: Vec<usize> = rw["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(w.shape, shape, "{name}");
                let bytes: Vec<u8> = w.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                assert_eq!(
                    hex::encode(Sha256::digest(&bytes)),
                    rw["sha256"].as_str().unwrap(),
                    "{fold} {name}"
                );
                assert_eq!(Some(f64::from(w.data[0])), rw["first"].as_f64(), "{name}");
                assert_eq!(
                    w.data.last().map(|&v| f64::from(v)),
                    rw["last"].as_f64(),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn reads_strided_views_as_torch_does() {
        // Offsets, a transposed and stepped view, a shared storage, a 0-d and an empty
        // tensor; values as torch read them back (make_checkpoint_reference.py).
        let reference = json("checkpoints/strided.json");
        let ck = read(&data("checkpoints/strided.pth")).unwrap();
        assert!(ck.mirroring_axes.is_empty());
        assert_eq!(ck.configuration, None);
        let r = reference.as_object().unwrap();
        assert_eq!(ck.weights.len(), r.len());
        for (name, rw) in r {
            let w = &ck.weights[name];
            let shape: Vec<usize> = rw["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let values: Vec<f64> = rw["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(w.shape, shape, "{name}");
            let got: Vec<f64> = w.data.iter().map(|&v| f64::from(v)).collect();
            assert_eq!(got, values, "{name}");
        }
    }

    #[test]
    fn refuses_other_dtypes_by_tensor_name() {
        let e = read(&data("checkpoints/half.pth")).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Tensor { name, why, .. } if name == "w" && why.contains("HalfStorage")),
            "{e}"
        );
    }

    /// A stored (or deflated) zip of these entries, written by the `zip` crate.
    fn archive(entries: &[(&str, &[u8])], deflate: bool) -> Vec<u8> {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let method = if deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let opts = zip::write::SimpleFileOptions::default().compression_method(method);
        for (name, bytes) in entries {
            z.start_file(*name, opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap().into_inner()
    }

    fn bu(s: &str) -> Vec<u8> {
        let mut v = vec![b'X'];
        v.extend((s.len() as u32).to_le_bytes());
        v.extend(s.as_bytes());
        v
    }

    /// LONG1 of a 64-bit int.
    fn int(v: i64) -> Vec<u8> {
        let mut b = vec![0x8a, 8];
        b.extend(v.to_le_bytes());
        b
    }

    /// `{'network_weights': {'w': <float32 view of storage '0' (numel 4): offset, size,
    /// stride>}, 'trainer_name': 'nnUNetTrainer'}` at protocol 2.
    fn tensor_pickle(offset: i64, size: &[i64], stride: &[i64]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'('];
        p.extend(bu("network_weights"));
        p.extend([b'}', b'(']);
        p.extend(bu("w"));
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        p.extend(bu("storage"));
        p.extend(b"ctorch\nFloatStorage\n");
        p.extend(bu("0"));
        p.extend(bu("cpu"));
        p.extend([b'K', 4, b't', b'Q']);
        p.extend(int(offset));
        for list in [size, stride] {
            p.push(b'(');
            for &v in list {
                p.extend(int(v));
            }
            p.push(b't');
        }
        p.push(0x89);
        p.extend(b"ccollections\nOrderedDict\n)Rt");
        p.extend([b'R', b'u']);
        p.extend(bu("trainer_name"));
        p.extend(bu("nnUNetTrainer"));
        p.extend([b'u', b'.']);
        p
    }

    fn one_tensor_pickle(offset: i64) -> Vec<u8> {
        tensor_pickle(offset, &[3], &[1])
    }

    #[test]
    fn reads_a_hand_made_archive_and_bounds_its_views() {
        let storage: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let p = Path::new("hand.pth");
        let ok = archive(
            &[
                ("x/data.pkl", &one_tensor_pickle(1)),
                ("x/data/0", &storage),
            ],
            false,
        );
        let ck = from_bytes(&ok, p).unwrap();
        assert_eq!(ck.weights["w"].data, vec![2.0, 3.0, 4.0]);
        assert_eq!(ck.trainer_name, "nnUNetTrainer");

        // offset 2 + 3 elements reaches element 4 of a 4-element storage.
        let oob = archive(
            &[
                ("x/data.pkl", &one_tensor_pickle(2)),
                ("x/data/0", &storage),
            ],
            false,
        );
        let e = from_bytes(&oob, p).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Tensor { name, why, .. } if name == "w" && why.contains("reaches element 4")),
            "{e}"
        );
        // A length-1 axis with an absurd stride (never applied); a transposed view:
        // element (i, j) is storage[offset + i + 2 j].
        let mut st = storage.clone();
        st[12..].copy_from_slice(&0.5f32.to_le_bytes());
        for (offset, size, stride, want) in [
            (1, &[1i64, 3][..], &[i64::MAX, 1][..], vec![2.0, 3.0, 0.5]),
            (0, &[2, 2], &[1, 2], vec![1.0, 3.0, 2.0, 0.5]),
        ] {
            let z = archive(
                &[
                    ("x/data.pkl", &tensor_pickle(offset, size, stride)),
                    ("x/data/0", &st),
                ],
                false,
            );
            let w = &from_bytes(&z, p).unwrap().weights["w"];
            assert_eq!(w.data, want, "{size:?} {stride:?}");
            assert_eq!(
                w.shape,
                size.iter().map(|&d| d as usize).collect::<Vec<_>>()
            );
        }
        // Views past the storage, negative or overflowing.
        for (offset, size, stride) in [
            (0i64, &[2i64, 2][..], &[i64::MAX, 1][..]),
            (i64::MAX, &[1], &[1]),
            (0, &[-1], &[1]),
            (0, &[5], &[0]),
        ] {
            let z = archive(
                &[
                    ("x/data.pkl", &tensor_pickle(offset, size, stride)),
                    ("x/data/0", &storage),
                ],
                false,
            );
            assert!(from_bytes(&z, p).is_err(), "{offset} {size:?} {stride:?}");
        }
        // The storage shorter than its record says.
        let short = archive(
            &[
                ("x/data.pkl", &one_tensor_pickle(0)),
                ("x/data/0", &storage[..12]),
            ],
            false,
        );
        let e = from_bytes(&short, p).unwrap_err();
        assert!(e.to_string().contains("storage has 12 bytes"), "{e}");
        // The storage missing.
        let missing = archive(&[("x/data.pkl", &one_tensor_pickle(0))], false);
        let e = from_bytes(&missing, p).unwrap_err();
        assert!(e.to_string().contains("x/data/0: missing"), "{e}");
        // Compressed entries.
        let deflated = archive(
            &[
                ("x/data.pkl", &one_tensor_pickle(0)),
                ("x/data/0", &storage),
            ],
            true,
        );
        let e = from_bytes(&deflated, p).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Entry { why, .. } if why.contains("compressed")),
            "{e}"
        );
        // A pickle that would run os.system under torch.load(weights_only=False).
        let mut evil = vec![0x80, 2];
        evil.extend(b"cos\nsystem\n");
        evil.extend(bu("touch /tmp/pwned"));
        evil.extend([0x85, b'R', b'.']);
        let e = from_bytes(&archive(&[("x/data.pkl", &evil)], false), p).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Pickle { source: PickleError::Global { module, name, .. }, .. } if module == "os" && name == "system"),
            "{e}"
        );
        assert!(e.to_string().contains("os.system"), "{e}");
        // Not a zip.
        let e = from_bytes(b"\x80\x02}.", p).unwrap_err();
        assert!(matches!(e, CheckpointError::Zip { .. }), "{e}");
    }

    #[test]
    fn a_corrupt_storage_is_refused_by_its_crc() {
        let mut bytes =
            std::fs::read(data(&format!("{MODEL}/fold_0/checkpoint_final.pth"))).unwrap();
        // Storage '0' (the first conv's weights) starts after data.pkl and the small
        // records; flip a byte in the middle of the file's tensor data.
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        let e = from_bytes(&bytes, Path::new("f.pth")).unwrap_err();
        assert!(e.to_string().contains("CRC-32"), "{e}");
    }

    #[test]
    fn fuzz_mutated_archives_never_panic() {
        let orig = std::fs::read(data("checkpoints/strided.pth")).unwrap();
        assert!(from_bytes(&orig, Path::new("s.pth")).is_ok());
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut refused = 0;
        for i in 0..2000 {
            let mut d = orig.clone();
            if i % 4 == 0 {
                d.truncate((next() % orig.len() as u64) as usize);
            } else {
                for _ in 0..1 + next() % 4 {
                    let at = (next() % d.len() as u64) as usize;
                    // Bias towards the headers and central directory at the end.
                    let at = if i % 2 == 0 {
                        d.len() - 1 - at % 200.min(d.len())
                    } else {
                        at
                    };
                    d[at] = next() as u8;
                }
            }
            if from_bytes(&d, Path::new("s.pth")).is_err() {
                refused += 1;
            }
        }
        assert!(refused > 500, "{refused}");
    }
}
