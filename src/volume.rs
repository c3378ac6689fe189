//! NIfTI-1 volumes: reading (with limits), writing, and voxel-grid geometry.
//!
//! This module owns everything that touches the bytes of a `.nii` / `.nii.gz` file, so the
//! rest of evald sees only [`Volume`]s: a flat buffer in NIfTI's own order (Fortran, index
//! `x + nx * (y + ny * z)`), the grid size, spacing in mm and the voxel-to-world affine.
//!
//! # Opening
//! Every file is opened through [`crate::files::open_regular`]: a FIFO, device or folder
//! where a volume is expected is refused at once ([`VolumeError::NotRegular`]) instead of
//! blocking a reader thread forever.
//!
//! # Limits
//! The header's size claims are checked against [`ReadLimits`] *before* anything big is
//! allocated: voxels ([`ReadLimits::max_voxels`], default [`DEFAULT_MAX_VOXELS`], also the
//! label ceiling [`DEFAULT_MAX_LABEL_VOXELS`]: 2^31 voxels = 2 GiB of `u8` output) and the
//! data section the header declares, voxels x bytes per stored voxel
//! ([`ReadLimits::max_data_bytes`], default [`DEFAULT_MAX_DATA_BYTES`] = 8 GiB, which
//! refuses e.g. a float64 "label map" of 2048 x 1024 x 1024 from its header alone). Callers
//! that know what a file must hold pass a tighter bound: the scorer reads a reference with
//! at most as many voxels as its prediction's grid, since no other reference can match it.
//! The output buffer is allocated fallibly and lazily zeroed, so a failed allocation is an
//! error for one case, not an abort of the daemon, and a header that lies costs only the
//! pages the data really fills.
//!
//! # Label maps: streamed
//! Labels are integers in 0..=255, so a label map never needs more memory than its `u8`
//! output: [`read_labels_with`] decodes the data section in chunks of
//! [`LABEL_CHUNK_BYTES`] stored bytes (through `flate2`'s multi-member gzip decoder reading
//! from the file, or from the plain file), converting each chunk into the output before the
//! next is read, whatever the stored datatype. Peak memory is the output plus one chunk,
//! independent of the datatype and of the compressed size. The one exception is the common
//! case, uint8 data without scaling in a gzip file of at most [`WHOLE_INFLATE_MAX_BYTES`]:
//! it is inflated by libdeflate in one call (the fastest way here) into a buffer of exactly
//! the declared size, holding the compressed file (bounded) meanwhile. Label maps never
//! pass through floating point unless stored as floats or scaled.
//!
//! # Images
//! [`read_image`] holds the decompressed data section whole (libdeflate, one call) and
//! converts it in parallel to `f32`; the compressed file is read whole only when its size
//! is plausible for the declared data (a gzip stream is barely larger than its content).
//!
//! Both readers refuse a gzip stream that inflates to more (a bomb) or less (truncation)
//! than the header declares, and read multi-member gzip (pigz, bgzip).
//!
//! Geometry follows `METRICS.md`: the affine is the sform when `sform_code > 0`, else the
//! qform, else `diag(pixdim)` (nibabel's order); spacing is `pixdim[1..=3]`. Two grids are
//! compared with [`Geometry::relate`]: identical, an exact reorientation (axis permutation
//! and flips, done by index arithmetic in [`reorient_to`]), or incompatible.

// 3x3 / 4x4 matrix arithmetic reads best with explicit row and column indices.
#![allow(clippy::needless_range_loop)]

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

/// Upper bound on voxels in one volume, checked against the header before allocating.
/// 2^31 voxels is a 2048 x 1024 x 1024 grid: far above any CT, far below a bomb.
pub const DEFAULT_MAX_VOXELS: u64 = 1 << 31;

/// Upper bound on voxels in a label map (what [`read_labels`] applies): one byte of output
/// per voxel, so at most 2 GiB per map whatever the stored datatype, since labels are
/// decoded in streaming fashion.
pub const DEFAULT_MAX_LABEL_VOXELS: u64 = DEFAULT_MAX_VOXELS;

/// Upper bound on the data section a header may declare (voxels x bytes per stored voxel):
/// 8 GiB, e.g. 2^31 voxels of float32 or 2^30 of float64. It bounds the work a lying header
/// can demand from the streaming label decoder (a float64 header claiming 2^31 voxels asks
/// for 16 GiB of inflating) and the memory [`read_image`] holds.
pub const DEFAULT_MAX_DATA_BYTES: u64 = 8 << 30;

/// Stored bytes decoded per step when a label map is streamed: the memory a label read
/// needs beyond its output. A multiple of every datatype's size.
pub const LABEL_CHUNK_BYTES: usize = 4 << 20;

/// Largest gzip file of uint8 labels inflated whole by libdeflate (the file is held in
/// memory meanwhile); larger ones are streamed like every other datatype.
pub const WHOLE_INFLATE_MAX_BYTES: u64 = 32 << 20;

/// Bytes read to parse a header: the 348-byte NIfTI-1 header and its 4-byte extension flag.
const HEAD_BYTES: usize = 352;

/// Grid tolerance for "the same grid", in mm (origin) and relative units (axes).
pub const GRID_TOLERANCE_MM: f64 = 1e-3;

/// What can go wrong with a volume file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The file could not be read at all.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a NIfTI-1 file we accept (bad magic, NIfTI-2, bad gzip, ...).
    #[error("{path}: not a valid NIfTI-1 file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
    /// The header declares something we refuse before allocating (size, dims, datatype).
    #[error("{path}: header refused: {reason}")]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
    /// The data section does not hold what the header declares.
    #[error("{path}: data does not match the header: {reason}")]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
    /// A label map holds a value that is not a label (negative, fractional, > 255).
    #[error("{path}: not a label map: {reason}")]
    NotLabels {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
    /// A FIFO, device, socket or folder where a volume file is expected (refused before any
    /// read, so a named pipe cannot block the reader).
    #[error("{path}: is a {kind}, not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead ("FIFO (named pipe)", "folder", ...).
        kind: &'static str,
    },
    /// Writing a volume failed.
    #[error("{path}: cannot write: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
}

/// Voxel grid: size, spacing and voxel-index-to-world (mm) affine.
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    /// Grid size `[nx, ny, nz]` (NIfTI i, j, k).
    pub dims: [usize; 3],
    /// Voxel size in mm along i, j, k (`pixdim[1..=3]`, absolute values).
    pub spacing: [f64; 3],
    /// Row-major 4x4 affine mapping `(i, j, k, 1)` to world mm.
    pub affine: [[f64; 4]; 4],
}

/// How a prediction's grid relates to the reference grid.
#[derive(Debug, Clone, PartialEq)]
pub enum GridRelation {
    /// Same shape and affine (within [`GRID_TOLERANCE_MM`]).
    Same,
    /// Same world grid, stored with permuted and/or flipped axes: `perm[a]` is the axis of the
    /// other volume that runs along axis `a` of this one, `flip[a]` whether it runs backwards.
    Reoriented {
        /// Source axis per target axis.
        perm: [usize; 3],
        /// Whether that source axis is reversed.
        flip: [bool; 3],
    },
    /// Anything else; the text says what differs.
    Incompatible(String),
}

/// A 3D volume in NIfTI order (Fortran: `x` fastest), with its geometry.
#[derive(Debug, Clone)]
pub struct Volume<T> {
    /// Grid of the data.
    pub geom: Geometry,
    /// `dims[0] * dims[1] * dims[2]` values, index `x + nx * (y + ny * z)`.
    pub data: Vec<T>,
}

/// A label map (class index per voxel).
pub type LabelVolume = Volume<u8>;
/// An intensity image (e.g. CT in HU after `scl_slope`/`scl_inter`).
pub type ImageVolume = Volume<f32>;

impl<T> Volume<T> {
    /// Number of voxels in one axial (`z`) slice.
    pub fn slice_len(&self) -> usize {
        self.geom.dims[0] * self.geom.dims[1]
    }
}

impl Geometry {
    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// True for a grid without voxels (never produced by the reader).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Volume of one voxel in mm^3.
    pub fn voxel_mm3(&self) -> f64 {
        self.spacing.iter().product()
    }

    /// Length of the volume's diagonal in mm: the "worst" distance METRICS.md assigns
    /// when exactly one mask is empty.
    pub fn diagonal_mm(&self) -> f64 {
        (0..3)
            .map(|a| (self.dims[a] as f64 * self.spacing[a]).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    /// A plain grid (axis-aligned affine `diag(spacing)` with origin `origin`), for tests and
    /// the demo's phantoms.
    pub fn axis_aligned(dims: [usize; 3], spacing: [f64; 3], origin: [f64; 3]) -> Self {
        let mut affine = [[0.0; 4]; 4];
        for a in 0..3 {
            affine[a][a] = spacing[a];
            affine[a][3] = origin[a];
        }
        affine[3][3] = 1.0;
        Geometry {
            dims,
            spacing,
            affine,
        }
    }

    /// Relate `self` (a prediction's grid) to `reference`.
    ///
    /// Exact reorientation is accepted only when every reference voxel centre is a voxel
    /// centre of `self` (a signed axis permutation with an integer offset), so no
    /// interpolation is ever needed.
    pub fn relate(&self, reference: &Geometry) -> GridRelation {
        if self.dims == reference.dims && affine_close(&self.affine, &reference.affine) {
            return GridRelation::Same;
        }
        // T = M_self^-1 * M_ref maps reference index steps to our index steps.
        let Some(inv) = invert3(&self.affine) else {
            return GridRelation::Incompatible(format!(
                "prediction affine is singular: {:?}",
                self.affine
            ));
        };
        let mut t = [[0.0; 3]; 3];
        for (r, row) in t.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = (0..3).map(|k| inv[r][k] * reference.affine[k][c]).sum();
            }
        }
        let mut perm = [usize::MAX; 3];
        let mut flip = [false; 3];
        // Column c of T says where reference axis c goes in our index space.
        for c in 0..3 {
            let mut hit = None;
            for r in 0..3 {
                let v = t[r][c];
                if (v.abs() - 1.0).abs() < 1e-4 {
                    if hit.is_some() {
                        hit = None;
                        break;
                    }
                    hit = Some((r, v < 0.0));
                } else if v.abs() > 1e-4 {
                    hit = None;
                    break;
                }
            }
            match hit {
                Some((r, f)) if !perm.contains(&r) => {
                    perm[c] = r;
                    flip[c] = f;
                }
                _ => {
                    return GridRelation::Incompatible(describe_difference(self, reference));
                }
            }
        }
        for c in 0..3 {
            if self.dims[perm[c]] != reference.dims[c] {
                return GridRelation::Incompatible(describe_difference(self, reference));
            }
        }
        // Reference voxel (0,0,0) must land exactly on our corner voxel of the mapped axes.
        let w0 = [
            reference.affine[0][3],
            reference.affine[1][3],
            reference.affine[2][3],
        ];
        let mut idx = [0.0; 3];
        for (r, v) in idx.iter_mut().enumerate() {
            *v = (0..3)
                .map(|k| inv[r][k] * (w0[k] - self.affine[k][3]))
                .sum();
        }
        for c in 0..3 {
            let want = if flip[c] {
                (self.dims[perm[c]] - 1) as f64
            } else {
                0.0
            };
            let err_mm = (idx[perm[c]] - want).abs() * self.spacing[perm[c]];
            if err_mm > GRID_TOLERANCE_MM {
                return GridRelation::Incompatible(describe_difference(self, reference));
            }
        }
        if perm == [0, 1, 2] && flip == [false; 3] {
            // Same axes and corner, but the affines differed: a tiny-but-real difference.
            return GridRelation::Incompatible(describe_difference(self, reference));
        }
        GridRelation::Reoriented { perm, flip }
    }
}

fn affine_close(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]) -> bool {
    (0..3).all(|r| (0..4).all(|c| (a[r][c] - b[r][c]).abs() <= GRID_TOLERANCE_MM))
}

fn describe_difference(p: &Geometry, r: &Geometry) -> String {
    let fmt_aff = |g: &Geometry| {
        g.affine[..3]
            .iter()
            .map(|row| format!("[{:.4} {:.4} {:.4} {:.4}]", row[0], row[1], row[2], row[3]))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "grids differ: prediction shape {:?} spacing {:?} affine {}; reference shape {:?} spacing {:?} affine {} \
         (only identical grids or pure axis permutations/flips of the same grid are accepted; resample the prediction onto the reference grid)",
        p.dims,
        p.spacing,
        fmt_aff(p),
        r.dims,
        r.spacing,
        fmt_aff(r)
    )
}

fn invert3(m: &[[f64; 4]; 4]) -> Option<[[f64; 3]; 3]> {
    let a = |r: usize, c: usize| m[r][c];
    let det = a(0, 0) * (a(1, 1) * a(2, 2) - a(1, 2) * a(2, 1))
        - a(0, 1) * (a(1, 0) * a(2, 2) - a(1, 2) * a(2, 0))
        + a(0, 2) * (a(1, 0) * a(2, 1) - a(1, 1) * a(2, 0));
    if det.abs() < 1e-12 {
        return None;
    }
    let inv_det = 1.0 / det;
    let mut out = [[0.0; 3]; 3];
    for r in 0..3 {
        for c in 0..3 {
            // cofactor transpose
            let (r1, r2) = ((c + 1) % 3, (c + 2) % 3);
            let (c1, c2) = ((r + 1) % 3, (r + 2) % 3);
            out[r][c] = (a(r1, c1) * a(r2, c2) - a(r1, c2) * a(r2, c1)) * inv_det;
        }
    }
    Some(out)
}

/// Copy `src` onto `target`'s grid given the axis mapping from [`Geometry::relate`].
/// Pure index arithmetic: every value is copied, none is interpolated.
pub fn reorient_to<T: Copy + Send + Sync + Default>(
    src: &Volume<T>,
    target: &Geometry,
    perm: [usize; 3],
    flip: [bool; 3],
) -> Volume<T> {
    let sd = src.geom.dims;
    let sstride = [1isize, sd[0] as isize, (sd[0] * sd[1]) as isize];
    // For each target axis: start offset and signed stride in the source buffer.
    let mut start = 0isize;
    let mut stride = [0isize; 3];
    for a in 0..3 {
        let s = sstride[perm[a]];
        if flip[a] {
            start += s * (sd[perm[a]] as isize - 1);
            stride[a] = -s;
        } else {
            stride[a] = s;
        }
    }
    let [nx, ny, nz] = target.dims;
    let mut data = vec![T::default(); nx * ny * nz];
    data.par_chunks_mut(nx * ny)
        .enumerate()
        .for_each(|(z, slice)| {
            let bz = start + stride[2] * z as isize;
            for y in 0..ny {
                let by = bz + stride[1] * y as isize;
                let row = &mut slice[y * nx..(y + 1) * nx];
                for (x, v) in row.iter_mut().enumerate() {
                    *v = src.data[(by + stride[0] * x as isize) as usize];
                }
            }
        });
    Volume {
        geom: target.clone(),
        data,
    }
}

/// Limits checked against the header before anything is allocated.
///
/// Build tighter ones from the default: `ReadLimits { max_voxels: n, ..Default::default() }`.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Largest accepted voxel count (for a label map: its output size in bytes).
    pub max_voxels: u64,
    /// Largest accepted data section (voxels x bytes per stored voxel), in bytes.
    pub max_data_bytes: u64,
    /// Why `max_voxels` is what it is, appended to the refusal ("... exceeds the limit of N
    /// voxels (WHY)") when a caller derives it from another file: the message must say whose
    /// problem it is.
    pub max_voxels_why: Option<&'static str>,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_voxels: DEFAULT_MAX_VOXELS,
            max_data_bytes: DEFAULT_MAX_DATA_BYTES,
            max_voxels_why: None,
        }
    }
}

/// A parsed header plus the raw (decompressed) bytes of its data section.
struct Raw {
    header: nifti::NiftiHeader,
    geom: Geometry,
    dtype: DType,
    bytes: Vec<u8>,
    offset: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum DType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl DType {
    fn from_code(code: i16) -> Option<DType> {
        Some(match code {
            2 => DType::U8,
            256 => DType::I8,
            512 => DType::U16,
            4 => DType::I16,
            768 => DType::U32,
            8 => DType::I32,
            1280 => DType::U64,
            1024 => DType::I64,
            16 => DType::F32,
            64 => DType::F64,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }
}

fn err_format(path: &Path, reason: impl Into<String>) -> VolumeError {
    VolumeError::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn err_header(path: &Path, reason: impl Into<String>) -> VolumeError {
    VolumeError::Header {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn err_data(path: &Path, reason: impl Into<String>) -> VolumeError {
    VolumeError::Data {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Read the header of a NIfTI-1 file (gzip or not) without reading its data.
///
/// # Errors
/// [`VolumeError`] naming the file when it cannot be read or parsed, or is not a regular
/// file.
pub fn read_geometry(path: &Path) -> Result<Geometry, VolumeError> {
    let (file, gz, file_len) = open_file(path)?;
    let mut s = Stream::new(path, FileSource::new(file, gz), gz, file_len);
    let head = s.head()?;
    let header = parse_header(path, &head)?;
    header_geometry(path, &header, ReadLimits::default())
}

fn err_io(path: &Path, source: std::io::Error) -> VolumeError {
    VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Open a volume file (regular files only, never blocking on a FIFO): the file positioned
/// at its start, whether it is gzip, and its size from `fstat`.
fn open_file(path: &Path) -> Result<(fs::File, bool, u64), VolumeError> {
    use crate::files::FileError;
    let mut f = crate::files::open_regular(path).map_err(|e| match e {
        FileError::Io { path, source } => VolumeError::Io { path, source },
        FileError::NotRegular { path, kind } => VolumeError::NotRegular { path, kind },
        other => err_format(path, other.to_string()),
    })?;
    let len = f.metadata().map_err(|e| err_io(path, e))?.len();
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err_io(path, e)),
        }
    }
    f.seek(SeekFrom::Start(0)).map_err(|e| err_io(path, e))?;
    Ok((f, got == 2 && magic == [0x1f, 0x8b], len))
}

/// The bytes of a volume file: the file itself, or the inflated stream of a gzip file.
enum FileSource {
    Plain(fs::File),
    // Boxed: the decoder's state is large, a plain file is one descriptor.
    Gz(Box<flate2::read::MultiGzDecoder<fs::File>>),
}

impl FileSource {
    fn new(file: fs::File, gz: bool) -> Self {
        if gz {
            FileSource::Gz(Box::new(flate2::read::MultiGzDecoder::new(file)))
        } else {
            FileSource::Plain(file)
        }
    }

    fn into_file(self) -> fs::File {
        match self {
            FileSource::Plain(f) => f,
            FileSource::Gz(d) => d.into_inner(),
        }
    }
}

impl Read for FileSource {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            FileSource::Plain(f) => f.read(buf),
            FileSource::Gz(d) => d.read(buf),
        }
    }
}

/// Sequential reader of a volume's (decompressed) bytes that knows how many the header
/// declares, so every short, broken or overlong stream is reported in the same words
/// whichever decoder reads it.
struct Stream<'p, R> {
    path: &'p Path,
    reader: R,
    gz: bool,
    /// Size of the file on disk (`fstat`); a plain file's truncation is judged by it.
    file_len: u64,
    /// Decompressed bytes consumed so far, header included.
    pos: u64,
    /// Where the data section starts, once the header is parsed.
    offset: u64,
    /// `offset` + data bytes the header declares, once it is parsed.
    need: u64,
}

impl<'p, R: Read> Stream<'p, R> {
    fn new(path: &'p Path, reader: R, gz: bool, file_len: u64) -> Self {
        Stream {
            path,
            reader,
            gz,
            file_len,
            pos: 0,
            offset: 0,
            need: 0,
        }
    }

    /// Up to [`HEAD_BYTES`] from the start (fewer only when the stream is shorter).
    fn head(&mut self) -> Result<Vec<u8>, VolumeError> {
        let mut h = vec![0u8; HEAD_BYTES];
        let mut got = 0;
        while got < h.len() {
            match self.reader.read(&mut h[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if self.gz => {
                    return Err(err_format(
                        self.path,
                        format!("gzip stream unreadable: {e}"),
                    ))
                }
                Err(e) => return Err(err_io(self.path, e)),
            }
        }
        h.truncate(got);
        self.pos = got as u64;
        Ok(h)
    }

    /// Fill `buf` exactly; a stream that ends or breaks first is a data error.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), VolumeError> {
        let mut got = 0;
        while got < buf.len() {
            match self.reader.read(&mut buf[got..]) {
                Ok(0) if self.gz => {
                    return Err(err_data(
                        self.path,
                        format!(
                            "gzip stream ends after {} bytes, header needs {} (truncated file?)",
                            self.pos, self.need
                        ),
                    ))
                }
                // The size was checked against fstat: the file shrank while being read.
                Ok(0) => return Err(truncated_plain(self.path, self.offset, self.need, self.pos)),
                Ok(k) => {
                    got += k;
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if self.gz => {
                    return Err(err_data(
                        self.path,
                        format!(
                            "gzip stream broken after {} of {} bytes: {e}",
                            self.pos, self.need
                        ),
                    ))
                }
                Err(e) => return Err(err_io(self.path, e)),
            }
        }
        Ok(())
    }

    /// Skip what lies between the header and the data (NIfTI extensions).
    fn skip_to_data(&mut self) -> Result<(), VolumeError> {
        let mut scratch = [0u8; 8192];
        while self.pos < self.offset {
            let k = (self.offset - self.pos).min(scratch.len() as u64) as usize;
            self.fill(&mut scratch[..k])?;
        }
        Ok(())
    }

    /// After the declared data: a gzip stream must end here (more output is a bomb or a
    /// header that lies). Bytes after a plain file's data were never an error.
    fn finish(&mut self) -> Result<(), VolumeError> {
        if !self.gz {
            return Ok(());
        }
        let mut probe = [0u8; 1];
        loop {
            return match self.reader.read(&mut probe) {
                Ok(0) => Ok(()),
                Ok(_) => Err(err_data(
                    self.path,
                    format!(
                        "decompresses to more than the {} bytes the header declares",
                        self.need
                    ),
                )),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(err_data(
                    self.path,
                    format!("gzip stream broken at its end: {e}"),
                )),
            };
        }
    }
}

fn truncated_plain(path: &Path, offset: u64, need: u64, have: u64) -> VolumeError {
    err_data(
        path,
        format!(
            "header declares {} data bytes at offset {offset}, file has only {} (truncated?)",
            need - offset,
            have.saturating_sub(offset)
        ),
    )
}

/// A buffer of `n` zero bytes, allocated fallibly (failure is this file's error, not an
/// abort of the process) and lazily: `alloc_zeroed` of a large size maps fresh zero pages,
/// so memory is only committed where the decoder writes.
fn zeroed(path: &Path, n: usize) -> Result<Vec<u8>, VolumeError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let fail = || {
        err_io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!("cannot allocate {n} bytes for its data"),
            ),
        )
    };
    let layout = std::alloc::Layout::array::<u8>(n).map_err(|_| fail())?;
    // SAFETY: `layout` has a non-zero size (n > 0).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return Err(fail());
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `[u8; n]` (so `Vec`
    // frees it with the same layout), all `n` bytes are initialised (zero), and length ==
    // capacity == n.
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<nifti::NiftiHeader, VolumeError> {
    if bytes.len() < 348 {
        return Err(err_format(
            path,
            format!(
                "only {} bytes; a NIfTI-1 header needs 348 (truncated or not NIfTI)",
                bytes.len()
            ),
        ));
    }
    let le = i32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let be = i32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if le == 540 || be == 540 {
        return Err(err_format(
            path,
            "NIfTI-2 is not supported; save the volume as NIfTI-1 (e.g. nibabel Nifti1Image)",
        ));
    }
    nifti::NiftiHeader::from_reader(bytes).map_err(|e| err_format(path, format!("{e}")))
}

fn header_geometry(
    path: &Path,
    h: &nifti::NiftiHeader,
    limits: ReadLimits,
) -> Result<Geometry, VolumeError> {
    let ndim = h.dim[0] as usize;
    if !(3..=7).contains(&ndim) {
        return Err(err_header(
            path,
            format!("dim[0] = {ndim}: a 3D volume is required"),
        ));
    }
    let dims = [h.dim[1] as usize, h.dim[2] as usize, h.dim[3] as usize];
    if dims.contains(&0) {
        return Err(err_header(path, format!("zero-sized dimension {dims:?}")));
    }
    if let Some(extra) = (4..=ndim).find(|&d| h.dim[d] > 1) {
        return Err(err_header(
            path,
            format!(
                "dim[{extra}] = {}: only 3D volumes (or 4D with one time point) are accepted",
                h.dim[extra]
            ),
        ));
    }
    let nvox = dims.iter().map(|&d| d as u64).product::<u64>();
    if nvox > limits.max_voxels {
        let why = limits
            .max_voxels_why
            .map(|w| format!(" ({w})"))
            .unwrap_or_default();
        return Err(err_header(
            path,
            format!(
                "{dims:?} = {nvox} voxels exceeds the limit of {} voxels{why}",
                limits.max_voxels
            ),
        ));
    }
    let mut spacing = [0.0; 3];
    for a in 0..3 {
        let s = f64::from(h.pixdim[a + 1]).abs();
        if !(s.is_finite() && s > 0.0) {
            return Err(err_header(
                path,
                format!(
                    "pixdim[{}] = {}: voxel spacing must be a positive number of mm",
                    a + 1,
                    h.pixdim[a + 1]
                ),
            ));
        }
        spacing[a] = s;
    }
    let affine = if h.sform_code > 0 {
        let mut m = [[0.0; 4]; 4];
        for (r, row) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
            for c in 0..4 {
                m[r][c] = f64::from(row[c]);
            }
        }
        m[3][3] = 1.0;
        m
    } else if h.qform_code > 0 {
        qform_affine(h, spacing)
    } else {
        Geometry::axis_aligned(dims, spacing, [0.0; 3]).affine
    };
    if affine.iter().flatten().any(|v| !v.is_finite()) {
        return Err(err_header(
            path,
            "affine (sform/qform) holds NaN or infinity",
        ));
    }
    Ok(Geometry {
        dims,
        spacing,
        affine,
    })
}

/// The NIfTI-1 quaternion affine (nifti1.h, method 2).
fn qform_affine(h: &nifti::NiftiHeader, spacing: [f64; 3]) -> [[f64; 4]; 4] {
    let (b, c, d) = (
        f64::from(h.quatern_b),
        f64::from(h.quatern_c),
        f64::from(h.quatern_d),
    );
    let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ];
    let s = [spacing[0], spacing[1], spacing[2] * qfac];
    let mut m = [[0.0; 4]; 4];
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = r[i][j] * s[j];
        }
    }
    m[0][3] = f64::from(h.quatern_x);
    m[1][3] = f64::from(h.quatern_y);
    m[2][3] = f64::from(h.quatern_z);
    m[3][3] = 1.0;
    m
}

/// A volume file with its header parsed and checked against the limits, positioned just
/// after the header.
struct Opened<'p> {
    stream: Stream<'p, FileSource>,
    header: nifti::NiftiHeader,
    geom: Geometry,
    dtype: DType,
}

fn open_volume(path: &Path, limits: ReadLimits) -> Result<Opened<'_>, VolumeError> {
    let (file, gz, file_len) = open_file(path)?;
    let mut stream = Stream::new(path, FileSource::new(file, gz), gz, file_len);
    let head = stream.head()?;
    let header = parse_header(path, &head)?;
    let geom = header_geometry(path, &header, limits)?;
    let dtype = DType::from_code(header.datatype).ok_or_else(|| {
        err_header(
            path,
            format!(
                "datatype code {} is not supported (use uint8/int16/int32/float32 ...)",
                header.datatype
            ),
        )
    })?;
    let offset = header.vox_offset.max(HEAD_BYTES as f32) as u64;
    if f64::from(header.vox_offset) > 1e9 {
        return Err(err_header(path, "vox_offset is absurd"));
    }
    let data_bytes = geom.len() as u64 * dtype.size() as u64;
    if data_bytes > limits.max_data_bytes {
        return Err(err_header(
            path,
            format!(
                "{:?} voxels of {dtype:?} are {data_bytes} data bytes, more than the limit of {} bytes",
                geom.dims, limits.max_data_bytes
            ),
        ));
    }
    stream.offset = offset;
    stream.need = offset + data_bytes;
    if !gz && file_len < stream.need {
        return Err(truncated_plain(path, offset, stream.need, file_len));
    }
    Ok(Opened {
        stream,
        header,
        geom,
        dtype,
    })
}

/// Read a whole regular file of at most `limit` bytes (already checked against `fstat`;
/// `take` guards against one that grows meanwhile).
fn read_whole(path: &Path, file: fs::File, limit: u64) -> Result<Vec<u8>, VolumeError> {
    let mut out = Vec::new();
    out.try_reserve_exact(limit as usize).map_err(|e| {
        err_io(
            path,
            std::io::Error::new(std::io::ErrorKind::OutOfMemory, e),
        )
    })?;
    file.take(limit)
        .read_to_end(&mut out)
        .map_err(|e| err_io(path, e))?;
    Ok(out)
}

/// Header plus the whole decompressed file, for [`read_image`] (which needs it all at once
/// for its parallel conversion).
fn read_raw(path: &Path, limits: ReadLimits) -> Result<Raw, VolumeError> {
    let Opened {
        stream,
        header,
        geom,
        dtype,
    } = open_volume(path, limits)?;
    let (gz, file_len, offset, need) = (stream.gz, stream.file_len, stream.offset, stream.need);
    let mut file = stream.reader.into_file();
    file.seek(SeekFrom::Start(0)).map_err(|e| err_io(path, e))?;
    let bytes = if gz {
        // Deflate expands incompressible data by well under 0.1 %, gzip adds a few dozen
        // bytes per member: a larger file cannot be a gzip of the declared data, and holding
        // it whole would cost memory for nothing.
        let bound = need + need / 256 + (1 << 20);
        if file_len > bound {
            return Err(err_data(
                path,
                format!(
                    "compressed file is {file_len} bytes, more than a gzip stream of the {need} bytes the header declares can be"
                ),
            ));
        }
        let comp = read_whole(path, file, file_len.min(bound))?;
        inflate_exact(path, &comp, need as usize)?
    } else {
        let b = read_whole(path, file, need)?;
        if (b.len() as u64) < need {
            return Err(truncated_plain(path, offset, need, b.len() as u64));
        }
        b
    };
    Ok(Raw {
        header,
        geom,
        dtype,
        bytes,
        offset: offset as usize,
    })
}

/// Inflate a gzip file into exactly `need` bytes: more output than the header declares
/// (a bomb, or a lying header) and less (truncation) are both errors.
fn inflate_exact(path: &Path, gz: &[u8], need: usize) -> Result<Vec<u8>, VolumeError> {
    // ISIZE (last 4 bytes) is the uncompressed size mod 2^32 of the *last* member; a mismatch
    // usually means a multi-member stream, which libdeflate cannot do in one call.
    let isize_trailer = gz
        .len()
        .checked_sub(4)
        .map(|i| u32::from_le_bytes(gz[i..].try_into().expect("4 bytes")));
    let mut out = zeroed(path, need)?;
    if isize_trailer == Some(need as u32) {
        let mut d = libdeflater::Decompressor::new();
        match d.gzip_decompress(gz, &mut out) {
            Ok(n) if n == need => return Ok(out),
            Ok(n) => {
                return Err(err_data(
                    path,
                    format!("decompressed {n} bytes, header needs {need} (truncated?)"),
                ))
            }
            Err(libdeflater::DecompressionError::InsufficientSpace) => {
                return Err(err_data(
                    path,
                    format!("decompresses to more than the {need} bytes the header declares"),
                ))
            }
            // Bad data may still be a valid multi-member stream: fall through.
            Err(libdeflater::DecompressionError::BadData) => {}
        }
    }
    let mut dec = flate2::read::MultiGzDecoder::new(gz);
    let mut filled = 0;
    while filled < need {
        match dec.read(&mut out[filled..]) {
            Ok(0) => {
                return Err(err_data(
                    path,
                    format!(
                    "gzip stream ends after {filled} bytes, header needs {need} (truncated file?)"
                ),
                ))
            }
            Ok(n) => filled += n,
            Err(e) => {
                return Err(err_data(
                    path,
                    format!("gzip stream broken after {filled} of {need} bytes: {e}"),
                ))
            }
        }
    }
    let mut probe = [0u8; 1];
    match dec.read(&mut probe) {
        Ok(0) => Ok(out),
        Ok(_) => Err(err_data(
            path,
            format!("decompresses to more than the {need} bytes the header declares"),
        )),
        Err(e) => Err(err_data(
            path,
            format!("gzip stream broken at its end: {e}"),
        )),
    }
}

macro_rules! decode_as {
    ($bytes:expr, $ty:ty, $be:expr, $n:expr, $conv:expr) => {{
        const W: usize = std::mem::size_of::<$ty>();
        let bytes: &[u8] = $bytes;
        let conv = $conv;
        let mut out = Vec::with_capacity($n);
        bytes[..$n * W]
            .par_chunks(W * 65536)
            .map(|chunk| {
                chunk
                    .chunks_exact(W)
                    .map(|c| {
                        let arr: [u8; W] = c.try_into().expect("width");
                        let v = if $be {
                            <$ty>::from_be_bytes(arr)
                        } else {
                            <$ty>::from_le_bytes(arr)
                        };
                        conv(v)
                    })
                    .collect::<Vec<_>>()
            })
            .collect_into_vec_flat(&mut out);
        out
    }};
}

trait CollectFlat<T> {
    fn collect_into_vec_flat(self, out: &mut Vec<T>);
}

impl<I, T> CollectFlat<T> for I
where
    I: IndexedParallelIterator<Item = Vec<T>>,
    T: Send,
{
    fn collect_into_vec_flat(self, out: &mut Vec<T>) {
        let parts: Vec<Vec<T>> = self.collect();
        for p in parts {
            out.extend(p);
        }
    }
}

fn is_be(h: &nifti::NiftiHeader) -> bool {
    matches!(h.endianness, nifti::Endianness::Big)
}

fn scaling(h: &nifti::NiftiHeader) -> Option<(f64, f64)> {
    let (s, i) = (f64::from(h.scl_slope), f64::from(h.scl_inter));
    if s == 0.0 || !s.is_finite() || !i.is_finite() || (s == 1.0 && i == 0.0) {
        None
    } else {
        Some((s, i))
    }
}

/// Read an intensity image (CT) as `f32`, applying `scl_slope`/`scl_inter`.
///
/// # Errors
/// [`VolumeError`] naming the file: unreadable, not NIfTI-1, refused header, truncated data.
pub fn read_image(path: &Path) -> Result<ImageVolume, VolumeError> {
    read_image_with(path, ReadLimits::default())
}

/// [`read_image`] with explicit limits.
///
/// # Errors
/// As [`read_image`].
pub fn read_image_with(path: &Path, limits: ReadLimits) -> Result<ImageVolume, VolumeError> {
    let raw = read_raw(path, limits)?;
    let n = raw.geom.len();
    let be = is_be(&raw.header);
    let (s, i) = scaling(&raw.header).unwrap_or((1.0, 0.0));
    let (s32, i32_) = (s as f32, i as f32);
    let b = &raw.bytes[raw.offset..];
    let data: Vec<f32> = match raw.dtype {
        DType::U8 => b[..n]
            .par_iter()
            .map(|&v| f32::from(v) * s32 + i32_)
            .collect(),
        DType::I8 => b[..n]
            .par_iter()
            .map(|&v| f32::from(v as i8) * s32 + i32_)
            .collect(),
        DType::U16 => decode_as!(b, u16, be, n, |v: u16| f32::from(v) * s32 + i32_),
        DType::I16 => decode_as!(b, i16, be, n, |v: i16| f32::from(v) * s32 + i32_),
        DType::U32 => decode_as!(b, u32, be, n, |v: u32| (f64::from(v) * s + i) as f32),
        DType::I32 => decode_as!(b, i32, be, n, |v: i32| (f64::from(v) * s + i) as f32),
        DType::U64 => decode_as!(b, u64, be, n, |v: u64| (v as f64 * s + i) as f32),
        DType::I64 => decode_as!(b, i64, be, n, |v: i64| (v as f64 * s + i) as f32),
        DType::F32 => decode_as!(b, f32, be, n, |v: f32| v * s32 + i32_),
        DType::F64 => decode_as!(b, f64, be, n, |v: f64| (v * s + i) as f32),
    };
    Ok(Volume {
        geom: raw.geom,
        data,
    })
}

/// Read a label map as `u8` without ever going through floating point for integer data,
/// streaming: memory is the output plus one [`LABEL_CHUNK_BYTES`] chunk whatever the stored
/// datatype. At most [`DEFAULT_MAX_LABEL_VOXELS`] voxels.
///
/// # Errors
/// [`VolumeError`] naming the file; [`VolumeError::NotLabels`] when a value is negative,
/// fractional or above 255 (naming the first such voxel); [`VolumeError::NotRegular`] for a
/// FIFO or device.
pub fn read_labels(path: &Path) -> Result<LabelVolume, VolumeError> {
    read_labels_with(
        path,
        ReadLimits {
            max_voxels: DEFAULT_MAX_LABEL_VOXELS,
            ..ReadLimits::default()
        },
    )
}

/// [`read_labels`] with explicit limits (e.g. at most the voxels of the grid the map must
/// match).
///
/// # Errors
/// As [`read_labels`]; [`VolumeError::Header`] when the header exceeds `limits`.
pub fn read_labels_with(path: &Path, limits: ReadLimits) -> Result<LabelVolume, VolumeError> {
    let Opened {
        stream,
        header,
        geom,
        dtype,
    } = open_volume(path, limits)?;
    let conv = LabelConv {
        dtype,
        be: is_be(&header),
        scale: scaling(&header),
    };
    if conv.is_identity() && stream.gz && stream.file_len <= WHOLE_INFLATE_MAX_BYTES {
        // Common case (uint8 .nii.gz of a few MB): one libdeflate call into a buffer of the
        // declared size, no conversion at all.
        let (offset, need, file_len) = (
            stream.offset as usize,
            stream.need as usize,
            stream.file_len,
        );
        let mut file = stream.reader.into_file();
        file.seek(SeekFrom::Start(0)).map_err(|e| err_io(path, e))?;
        let comp = read_whole(path, file, file_len)?;
        let mut data = inflate_exact(path, &comp, need)?;
        data.copy_within(offset.., 0);
        data.truncate(need - offset);
        data.shrink_to_fit();
        return Ok(Volume { geom, data });
    }
    let mut stream = stream;
    let data = stream_labels(&mut stream, &geom, conv)?;
    Ok(Volume { geom, data })
}

/// How stored values become labels.
#[derive(Debug, Clone, Copy)]
struct LabelConv {
    dtype: DType,
    be: bool,
    scale: Option<(f64, f64)>,
}

impl LabelConv {
    /// uint8 without scaling: the stored bytes are the labels.
    fn is_identity(self) -> bool {
        self.dtype == DType::U8 && self.scale.is_none()
    }

    fn of_float(self, v: f64) -> Option<u8> {
        let v = match self.scale {
            Some((s, i)) => v * s + i,
            None => v,
        };
        (v.is_finite() && (0.0..=255.0).contains(&v) && v.fract() == 0.0).then_some(v as u8)
    }

    fn of_int(self, v: i64) -> Option<u8> {
        if self.scale.is_some() {
            self.of_float(v as f64)
        } else {
            u8::try_from(v).ok()
        }
    }

    /// Convert one chunk of stored values (`src`, whole values only) into `dst` (one label
    /// per value); the index of the first value that is not a label, if any (`dst` is then
    /// only partly written).
    fn chunk(self, src: &[u8], dst: &mut [u8]) -> Option<usize> {
        macro_rules! via {
            ($ty:ty, $to:expr) => {{
                let (be, to) = (self.be, $to);
                convert_par(src, dst, move |a: [u8; std::mem::size_of::<$ty>()]| {
                    to(if be {
                        <$ty>::from_be_bytes(a)
                    } else {
                        <$ty>::from_le_bytes(a)
                    })
                })
            }};
        }
        let int = move |v: i64| self.of_int(v);
        let float = move |v: f64| self.of_float(v);
        match self.dtype {
            DType::U8 => via!(u8, move |v: u8| int(i64::from(v))),
            DType::I8 => via!(i8, move |v: i8| int(i64::from(v))),
            DType::U16 => via!(u16, move |v: u16| int(i64::from(v))),
            DType::I16 => via!(i16, move |v: i16| int(i64::from(v))),
            DType::U32 => via!(u32, move |v: u32| int(i64::from(v))),
            DType::I32 => via!(i32, move |v: i32| int(i64::from(v))),
            DType::U64 => via!(u64, move |v: u64| int(i64::try_from(v).unwrap_or(-1))),
            DType::I64 => via!(i64, int),
            DType::F32 => via!(f32, move |v: f32| float(f64::from(v))),
            DType::F64 => via!(f64, float),
        }
    }
}

/// `dst[i] = f(src value i)` in parallel pieces; the first index where `f` refuses.
fn convert_par<const W: usize>(
    src: &[u8],
    dst: &mut [u8],
    f: impl Fn([u8; W]) -> Option<u8> + Sync,
) -> Option<usize> {
    const PIECE: usize = 1 << 16;
    dst.par_chunks_mut(PIECE)
        .zip(src.par_chunks(PIECE * W))
        .enumerate()
        .filter_map(|(k, (d, s))| {
            for (i, (o, c)) in d.iter_mut().zip(s.chunks_exact(W)).enumerate() {
                match f(c.try_into().expect("W bytes")) {
                    Some(v) => *o = v,
                    None => return Some(k * PIECE + i),
                }
            }
            None
        })
        .min()
}

/// Decode the data section of `s` (positioned after the header) into one label per voxel,
/// [`LABEL_CHUNK_BYTES`] of stored data at a time.
fn stream_labels<R: Read>(
    s: &mut Stream<'_, R>,
    geom: &Geometry,
    conv: LabelConv,
) -> Result<Vec<u8>, VolumeError> {
    s.skip_to_data()?;
    let n = geom.len();
    let mut out = zeroed(s.path, n)?;
    if conv.is_identity() {
        s.fill(&mut out)?;
        s.finish()?;
        return Ok(out);
    }
    let w = conv.dtype.size();
    let per_chunk = LABEL_CHUNK_BYTES / w;
    let mut chunk = vec![0u8; per_chunk.min(n) * w];
    let mut bad = None;
    let mut done = 0;
    while done < n {
        let m = per_chunk.min(n - done);
        let src = &mut chunk[..m * w];
        s.fill(src)?;
        if bad.is_none() {
            if let Some(i) = conv.chunk(src, &mut out[done..done + m]) {
                bad = Some(done + i);
                // A plain file's size was checked up front: nothing more to learn from it.
                // A gzip stream is read to its end so that a truncated or overlong stream is
                // reported as such, as when the whole stream was inflated first.
                if !s.gz {
                    break;
                }
            }
        }
        done += m;
    }
    s.finish()?;
    if let Some(pos) = bad {
        let d = geom.dims;
        let (x, y, z) = (pos % d[0], (pos / d[0]) % d[1], pos / (d[0] * d[1]));
        return Err(VolumeError::NotLabels {
            path: s.path.to_path_buf(),
            reason: format!(
                "voxel ({x}, {y}, {z}) holds a value that is not an integer label in 0..=255 \
                 (datatype {:?}); save predictions and references as integer label maps",
                conv.dtype
            ),
        });
    }
    Ok(out)
}

/// A NIfTI-1 header describing `geom` (sform and qform both set, units mm).
pub fn header_for(geom: &Geometry) -> nifti::NiftiHeader {
    let mut h = nifti::NiftiHeader {
        dim: [
            3,
            geom.dims[0] as u16,
            geom.dims[1] as u16,
            geom.dims[2] as u16,
            1,
            1,
            1,
            1,
        ],
        ..Default::default()
    };
    h.pixdim = [
        1.0,
        geom.spacing[0] as f32,
        geom.spacing[1] as f32,
        geom.spacing[2] as f32,
        1.0,
        1.0,
        1.0,
        1.0,
    ];
    h.sform_code = 1;
    h.qform_code = 0;
    let row = |r: usize| {
        [
            geom.affine[r][0] as f32,
            geom.affine[r][1] as f32,
            geom.affine[r][2] as f32,
            geom.affine[r][3] as f32,
        ]
    };
    h.srow_x = row(0);
    h.srow_y = row(1);
    h.srow_z = row(2);
    h.xyzt_units = 2 | 8; // mm, sec
    h.scl_slope = 1.0;
    h.scl_inter = 0.0;
    h
}

/// Write a volume as `.nii.gz` (or `.nii` by extension) with `geom`'s grid.
///
/// # Errors
/// [`VolumeError::Write`] naming the file.
pub fn write_volume<T>(path: &Path, vol: &Volume<T>) -> Result<(), VolumeError>
where
    T: nifti::DataElement + bytemuck::Pod,
{
    let [nx, ny, nz] = vol.geom.dims;
    use ndarray::ShapeBuilder;
    let arr = ndarray::Array::from_shape_vec(ndarray::IxDyn(&[nx, ny, nz]).f(), vol.data.clone())
        .map_err(|e| VolumeError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let header = header_for(&vol.geom);
    nifti::writer::WriterOptions::new(path)
        .reference_header(&header)
        .write_nifti(&arr)
        .map_err(|e| VolumeError::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(dims: [usize; 3]) -> Geometry {
        Geometry::axis_aligned(dims, [0.7, 0.8, 2.5], [-10.0, 5.0, 30.0])
    }

    #[test]
    fn roundtrip_labels_and_image() {
        let dir = tempfile::tempdir().unwrap();
        let g = geom([5, 4, 3]);
        let data: Vec<u8> = (0..60).map(|i| (i % 7) as u8).collect();
        let p = dir.path().join("l.nii.gz");
        write_volume(
            &p,
            &Volume {
                geom: g.clone(),
                data: data.clone(),
            },
        )
        .unwrap();
        let back = read_labels(&p).unwrap();
        assert_eq!(back.data, data);
        assert_eq!(back.geom.dims, g.dims);
        assert!((back.geom.spacing[2] - 2.5).abs() < 1e-6);
        assert_eq!(back.geom.relate(&g), GridRelation::Same);
        let img: Vec<i16> = (0..60).map(|i| i as i16 * 10 - 300).collect();
        let p2 = dir.path().join("i.nii");
        write_volume(
            &p2,
            &Volume {
                geom: g.clone(),
                data: img.clone(),
            },
        )
        .unwrap();
        let im = read_image(&p2).unwrap();
        assert_eq!(im.data[7], f32::from(img[7]));
    }

    #[test]
    fn flipped_and_permuted_grid_is_an_exact_reorientation() {
        let r = geom([4, 3, 2]);
        // Prediction stored with x flipped and y/z swapped: p index (i', j', k') where
        // i' = 3 - x, j' = z, k' = y.
        let mut p = Geometry {
            dims: [4, 2, 3],
            spacing: [0.7, 2.5, 0.8],
            affine: [[0.0; 4]; 4],
        };
        // world = R.affine * (x,y,z); x = 3 - i', y = k', z = j'
        p.affine[0] = [-0.7, 0.0, 0.0, -10.0 + 0.7 * 3.0];
        p.affine[1] = [0.0, 0.0, 0.8, 5.0];
        p.affine[2] = [0.0, 2.5, 0.0, 30.0];
        p.affine[3] = [0.0, 0.0, 0.0, 1.0];
        let GridRelation::Reoriented { perm, flip } = p.relate(&r) else {
            panic!("expected reorientation, got {:?}", p.relate(&r));
        };
        let mut pdata = vec![0u16; 24];
        for x in 0..4 {
            for y in 0..3 {
                for z in 0..2 {
                    let (i, j, k) = (3 - x, z, y);
                    pdata[i + 4 * (j + 2 * k)] = (x + 10 * y + 100 * z) as u16;
                }
            }
        }
        let out = reorient_to(
            &Volume {
                geom: p,
                data: pdata,
            },
            &r,
            perm,
            flip,
        );
        for x in 0..4 {
            for y in 0..3 {
                for z in 0..2 {
                    assert_eq!(out.data[x + 4 * (y + 3 * z)], (x + 10 * y + 100 * z) as u16);
                }
            }
        }
    }

    #[test]
    fn label_chunks_report_the_first_bad_value_across_parallel_pieces() {
        let conv = LabelConv {
            dtype: DType::I16,
            be: false,
            scale: None,
        };
        let n = 3 * 65536 + 5;
        let mut vals = vec![7i16; n];
        vals[2 * 65536] = -1;
        vals[65536 + 3] = 300;
        let bytes = |v: &[i16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut dst = vec![0u8; n];
        assert_eq!(conv.chunk(&bytes(&vals), &mut dst), Some(65536 + 3));
        vals[65536 + 3] = 7;
        assert_eq!(conv.chunk(&bytes(&vals), &mut dst), Some(2 * 65536));
        vals[2 * 65536] = 255;
        assert_eq!(conv.chunk(&bytes(&vals), &mut dst), None);
        assert!(dst[..2 * 65536].iter().all(|&l| l == 7) && dst[2 * 65536] == 255);
    }

    #[test]
    fn an_impossible_allocation_is_an_error_not_an_abort() {
        let p = Path::new("huge.nii.gz");
        for n in [usize::MAX, isize::MAX as usize - 4096] {
            let e = zeroed(p, n).unwrap_err();
            assert!(
                e.to_string()
                    .contains("huge.nii.gz: cannot read: cannot allocate"),
                "{e}"
            );
        }
        assert_eq!(zeroed(p, 3).unwrap(), vec![0u8; 3]);
    }

    #[test]
    fn an_image_gzip_far_larger_than_its_data_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.nii.gz");
        let g = geom([4, 4, 4]);
        write_volume(
            &p,
            &Volume {
                geom: g,
                data: vec![1i16; 64],
            },
        )
        .unwrap();
        let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
        std::io::Write::write_all(&mut f, &vec![0u8; 2 << 20]).unwrap();
        let e = read_image(&p).unwrap_err();
        assert!(matches!(e, VolumeError::Data { .. }), "{e}");
        assert!(e.to_string().contains("compressed file is"), "{e}");
    }

    #[test]
    fn shifted_grid_is_incompatible() {
        let r = geom([4, 3, 2]);
        let mut p = r.clone();
        p.affine[0][3] += 0.35;
        assert!(matches!(p.relate(&r), GridRelation::Incompatible(_)));
        let mut q = r.clone();
        q.spacing[0] = 1.0;
        q.affine[0][0] = 1.0;
        assert!(matches!(q.relate(&r), GridRelation::Incompatible(_)));
    }
}
