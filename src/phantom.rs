//! Seeded CT-like neck phantoms with reference labels (0 background, 1 thyroid, 2 nodule),
//! and a small TorchScript "vendor model" traced in Rust that segments them: everything
//! `evald demo`, the tests and the benchmarks need, with no data or Python.
//!
//! The anatomy (mm, centred on the volume) follows `shared/bench/gen_phantoms.py` (copied into `bench/`) in
//! spirit: a body ellipse with a fat rim, trachea, vertebra, two thyroid lobes and
//! hypodense nodules inside them, Gaussian noise. Intensities are chosen so that a
//! smoothed-threshold model separates the classes imperfectly at the borders, which gives
//! realistic (not perfect) scores. Layout is nnU-Net's: `imagesTs/<case>_0000.nii.gz`
//! (int16 HU) and `labelsTs/<case>.nii.gz` (uint8).
//!
//! Case schedule: case 3 (mod 5) has no nodule (a tumour-free patient), so patient-level
//! diagnosis and empty-mask conventions are exercised.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::volume::{self, Geometry, Volume, VolumeError};

/// HU of each tissue.
pub mod hu {
    /// Air.
    pub const AIR: f32 = -1000.0;
    /// Subcutaneous fat.
    pub const FAT: f32 = -100.0;
    /// Muscle / soft tissue.
    pub const TISSUE: f32 = 40.0;
    /// Contrast-enhanced thyroid.
    pub const THYROID: f32 = 120.0;
    /// Hypodense nodule.
    pub const NODULE: f32 = -20.0;
    /// Bone.
    pub const BONE: f32 = 700.0;
}

/// Noise standard deviation inside the body (HU).
pub const NOISE_HU: f32 = 12.0;

/// Deterministic RNG ([`crate::stats::rng::SplitMix64`], the bootstrap's generator) with
/// uniform and normal draws. The seed is mixed first so that the phantoms stay those of
/// earlier releases.
#[derive(Debug, Clone)]
pub struct Rng(crate::stats::rng::SplitMix64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(crate::stats::rng::SplitMix64::new(
            seed ^ 0x9E37_79B9_7F4A_7C15,
        ))
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform(f64::MIN_POSITIVE, 1.0);
        let u2 = self.uniform(0.0, 1.0);
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[derive(Debug, Clone)]
struct Ellipsoid {
    c: [f64; 3],
    r: [f64; 3],
}

impl Ellipsoid {
    fn contains(&self, p: [f64; 3]) -> bool {
        (0..3)
            .map(|a| ((p[a] - self.c[a]) / self.r[a]).powi(2))
            .sum::<f64>()
            <= 1.0
    }
}

/// What one phantom case contains.
#[derive(Debug, Clone)]
pub struct CaseInfo {
    /// Case id (`case_000`).
    pub id: String,
    /// Nodules placed.
    pub nodules: usize,
}

/// Generate one case's image and labels.
pub fn render(
    dims: [usize; 3],
    spacing: [f64; 3],
    seed: u64,
    index: usize,
) -> (Volume<i16>, Volume<u8>, CaseInfo) {
    let mut rng = Rng::new(seed.wrapping_mul(100_003).wrapping_add(index as u64));
    let body = [60.0 * rng.uniform(0.9, 1.1), 50.0 * rng.uniform(0.9, 1.1)];
    let fat = rng.uniform(4.0, 8.0);
    let trach_r = rng.uniform(7.0, 9.0);
    let trach_y = -18.0 + rng.uniform(-2.0, 2.0);
    let vert_r = rng.uniform(11.0, 14.0);
    let vert_y = 22.0 + rng.uniform(-2.0, 2.0);
    let zc = rng.uniform(-5.0, 5.0);
    let lobes: Vec<Ellipsoid> = [-1.0, 1.0]
        .iter()
        .map(|side| Ellipsoid {
            c: [
                side * (trach_r + rng.uniform(8.0, 11.0)),
                trach_y + rng.uniform(-3.0, 1.0),
                zc + rng.uniform(-4.0, 4.0),
            ],
            r: [
                rng.uniform(7.0, 10.0),
                rng.uniform(8.0, 11.0),
                rng.uniform(20.0, 26.0),
            ],
        })
        .collect();
    let n_nod = if index % 5 == 3 {
        0
    } else {
        1 + (rng.next_u64() % 3) as usize
    };
    let nodules: Vec<Ellipsoid> = (0..n_nod)
        .map(|_| {
            let lobe = &lobes[(rng.next_u64() % 2) as usize];
            let r = rng.uniform(3.0, 6.0);
            let u = [
                rng.uniform(-0.4, 0.4),
                rng.uniform(-0.4, 0.4),
                rng.uniform(-0.4, 0.4),
            ];
            Ellipsoid {
                c: [
                    lobe.c[0] + u[0] * lobe.r[0],
                    lobe.c[1] + u[1] * lobe.r[1],
                    lobe.c[2] + u[2] * lobe.r[2],
                ],
                r: [r, r, r],
            }
        })
        .collect();
    let [nx, ny, nz] = dims;
    let centre = |i: usize, a: usize| (i as f64 - (dims[a] as f64 - 1.0) / 2.0) * spacing[a];
    let slices: Vec<(Vec<i16>, Vec<u8>)> = (0..nz)
        .into_par_iter()
        .map(|k| {
            let mut rng = Rng::new(seed ^ ((index as u64) << 32) ^ k as u64);
            let z = centre(k, 2);
            let mut img = vec![0i16; nx * ny];
            let mut lab = vec![0u8; nx * ny];
            for j in 0..ny {
                let y = centre(j, 1);
                for i in 0..nx {
                    let x = centre(i, 0);
                    let p = [x, y, z];
                    let (a, b) = (body[0], body[1]);
                    let mut v = hu::AIR;
                    let mut l = 0u8;
                    let in_body = (x / a).powi(2) + (y / b).powi(2) <= 1.0;
                    let inner = (x / (a - fat)).powi(2) + (y / (b - fat)).powi(2) <= 1.0;
                    if in_body {
                        v = hu::FAT;
                    }
                    if inner {
                        v = hu::TISSUE;
                        if x * x + (y - vert_y).powi(2) <= vert_r * vert_r {
                            v = hu::BONE;
                        }
                        if lobes.iter().any(|e| e.contains(p)) {
                            v = hu::THYROID;
                            l = 1;
                            if nodules.iter().any(|e| e.contains(p)) {
                                v = hu::NODULE;
                                l = 2;
                            }
                        }
                        if x * x + (y - trach_y).powi(2) <= trach_r * trach_r {
                            v = hu::AIR;
                            l = 0;
                        }
                    }
                    let sigma = if v > -950.0 { NOISE_HU } else { 4.0 };
                    let n = rng.normal() as f32 * sigma;
                    img[j * nx + i] = (v + n).round().clamp(-1024.0, 3071.0) as i16;
                    lab[j * nx + i] = l;
                }
            }
            (img, lab)
        })
        .collect();
    let mut img = Vec::with_capacity(nx * ny * nz);
    let mut lab = Vec::with_capacity(nx * ny * nz);
    for (i, l) in slices {
        img.extend(i);
        lab.extend(l);
    }
    // LPS-like orientation as DICOM-converted CTs: x and y flipped, centred at 0.
    let mut geom = Geometry::axis_aligned(dims, spacing, [0.0; 3]);
    geom.affine[0][0] = -spacing[0];
    geom.affine[1][1] = -spacing[1];
    for (a, &n) in dims.iter().enumerate() {
        let c = (n as f64 - 1.0) / 2.0;
        geom.affine[a][3] = -geom.affine[a][a] * c;
    }
    let info = CaseInfo {
        id: format!("case_{index:03}"),
        nodules: n_nod,
    };
    (
        Volume {
            geom: geom.clone(),
            data: img,
        },
        Volume { geom, data: lab },
        info,
    )
}

/// Where a generated set lives.
#[derive(Debug, Clone)]
pub struct PhantomSet {
    /// `imagesTs`.
    pub images: PathBuf,
    /// `labelsTs`.
    pub labels: PathBuf,
    /// What was generated.
    pub cases: Vec<CaseInfo>,
}

/// Write `n` cases under `out` (nnU-Net layout).
///
/// # Errors
/// [`VolumeError::Write`] when a file cannot be written.
pub fn generate(
    out: &Path,
    n: usize,
    dims: [usize; 3],
    spacing: [f64; 3],
    seed: u64,
) -> Result<PhantomSet, VolumeError> {
    let images = out.join("imagesTs");
    let labels = out.join("labelsTs");
    for d in [&images, &labels] {
        std::fs::create_dir_all(d).map_err(|e| VolumeError::Write {
            path: d.clone(),
            reason: e.to_string(),
        })?;
    }
    let mut cases = Vec::new();
    for i in 0..n {
        let (img, lab, info) = render(dims, spacing, seed, i);
        let (a, b) = rayon::join(
            || volume::write_volume(&images.join(format!("{}_0000.nii.gz", info.id)), &img),
            || volume::write_volume(&labels.join(format!("{}.nii.gz", info.id)), &lab),
        );
        a?;
        b?;
        cases.push(info);
    }
    Ok(PhantomSet {
        images,
        labels,
        cases,
    })
}

/// Trace the demo "vendor model" and save it as TorchScript: `[N,1,H,W]` windowed CT
/// (level 40, width 400) -> `[N,3,H,W]` logits. It smooths with a 3x3 mean and scores each
/// class by how close the intensity is to that class's HU, i.e. a vendor model that is
/// good inside organs and unsure at their borders. Two context gates stand in for what a
/// trained model learns: where a 5x5 neighbourhood holds bone it is not thyroid (the
/// bone/tissue edge passes through thyroid HU), and where it holds fat or air it is not a
/// nodule (so do the fat/tissue and air/tissue edges).
///
/// # Errors
/// libtorch errors while tracing or saving.
pub fn write_demo_model(path: &Path) -> Result<(), tch::TchError> {
    use tch::{Kind, Tensor};
    let window = |h: f32| (h - (40.0 - 200.0)) / 400.0;
    let example = Tensor::f_zeros([2, 1, 16, 16], (Kind::Float, tch::Device::Cpu))?;
    let mut f = |xs: &[Tensor]| -> Vec<Tensor> {
        let x = &xs[0];
        let s = x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>);
        let score = |centre: f32, half: f32| -> Tensor {
            let d: Tensor = (&s - f64::from(window(centre))) / f64::from(half / 400.0);
            1.0 - &d * &d
        };
        let max5 = s.max_pool2d([5, 5], [1, 1], [2, 2], [1, 1], false);
        let min5 = -(-&s).max_pool2d([5, 5], [1, 1], [2, 2], [1, 1], false);
        let gate = |violation: Tensor| -> Tensor { violation.clamp_min(0.0) * 100.0 };
        let thyroid = score(hu::THYROID, 45.0) - gate(max5 - f64::from(window(200.0)));
        let nodule = score(hu::NODULE, 28.0) - gate(f64::from(window(-60.0)) - min5);
        let background = s.zeros_like();
        vec![Tensor::cat(&[background, thyroid, nodule], 1)]
    };
    let m = tch::CModule::create_by_tracing("evald_demo", "forward", &[example], &mut f)?;
    m.save(path)
}
