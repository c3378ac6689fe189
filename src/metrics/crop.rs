//! Bounding boxes of labels and binary crops of one label: the surface and lesion metrics
//! work on the union box of the two masks only (the speed note of METRICS.md: the crop is
//! where the time goes), never on the whole grid.
//!
//! [`label_boxes`] finds the box of every label of a volume in one parallel pass that skips
//! background eight voxels at a time, so scoring many classes costs one scan per volume.

use rayon::prelude::*;

use crate::volume::LabelVolume;

/// Inclusive voxel box `lo..=hi` per axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BBox {
    /// Smallest index per axis.
    pub lo: [usize; 3],
    /// Largest index per axis (inclusive).
    pub hi: [usize; 3],
}

impl BBox {
    /// The smallest box holding both.
    pub fn union(self, other: BBox) -> BBox {
        BBox {
            lo: std::array::from_fn(|a| self.lo[a].min(other.lo[a])),
            hi: std::array::from_fn(|a| self.hi[a].max(other.hi[a])),
        }
    }

    /// Extent in voxels per axis.
    pub fn dims(&self) -> [usize; 3] {
        std::array::from_fn(|a| self.hi[a] - self.lo[a] + 1)
    }

    /// Union of two optional boxes.
    pub fn union_opt(a: Option<BBox>, b: Option<BBox>) -> Option<BBox> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.union(b)),
            (a, None) => a,
            (None, b) => b,
        }
    }
}

/// Per-label accumulator of one scan.
#[derive(Clone)]
struct Acc {
    lo: Vec<[u32; 3]>,
    hi: Vec<[u32; 3]>,
}

impl Acc {
    fn new() -> Self {
        Acc {
            lo: vec![[u32::MAX; 3]; 256],
            hi: vec![[0; 3]; 256],
        }
    }

    #[inline]
    fn add(&mut self, label: u8, x: usize, y: usize, z: usize) {
        let l = label as usize;
        let p = [x as u32, y as u32, z as u32];
        for ((lo, hi), v) in self.lo[l].iter_mut().zip(&mut self.hi[l]).zip(p) {
            *lo = (*lo).min(v);
            *hi = (*hi).max(v);
        }
    }

    fn merge(mut self, o: Acc) -> Acc {
        for l in 0..256 {
            for a in 0..3 {
                self.lo[l][a] = self.lo[l][a].min(o.lo[l][a]);
                self.hi[l][a] = self.hi[l][a].max(o.hi[l][a]);
            }
        }
        self
    }
}

/// Box of every label value (index = label; entry 0, background, is computed too but
/// never used). `None` where the label does not occur.
pub fn label_boxes(vol: &LabelVolume) -> Vec<Option<BBox>> {
    label_boxes_on(vol, |_| true)
}

/// [`label_boxes`] scanning only the z-slices for which `slice` is true: exact for every
/// label that occurs on no other slice (the caller knows, e.g. from the per-slice overlap
/// tally, which slices hold the labels it cares about).
pub fn label_boxes_on(
    vol: &LabelVolume,
    slice: impl Fn(usize) -> bool + Sync,
) -> Vec<Option<BBox>> {
    let [nx, ny, _] = vol.geom.dims;
    let plane = nx * ny;
    if plane == 0 {
        return vec![None; 256];
    }
    let acc = vol
        .data
        .par_chunks(plane)
        .enumerate()
        .filter(|(z, _)| slice(*z))
        .fold(Acc::new, |mut acc, (z, slice)| {
            for (y, row) in slice.chunks_exact(nx).enumerate() {
                scan_row(row, |x, v| acc.add(v, x, y, z));
            }
            acc
        })
        .reduce(Acc::new, Acc::merge);
    (0..256)
        .map(|l| {
            (acc.lo[l][0] != u32::MAX).then(|| BBox {
                lo: acc.lo[l].map(|v| v as usize),
                hi: acc.hi[l].map(|v| v as usize),
            })
        })
        .collect()
}

/// Box of one label (a full scan; [`label_boxes`] does all labels at the same cost).
pub fn label_box(vol: &LabelVolume, label: u8) -> Option<BBox> {
    let [nx, ny, _] = vol.geom.dims;
    let plane = nx * ny;
    if plane == 0 {
        return None;
    }
    vol.data
        .par_chunks(plane)
        .enumerate()
        .filter_map(|(z, slice)| {
            let mut b: Option<BBox> = None;
            for (y, row) in slice.chunks_exact(nx).enumerate() {
                scan_row(row, |x, v| {
                    if v == label {
                        let p = BBox {
                            lo: [x, y, z],
                            hi: [x, y, z],
                        };
                        b = Some(b.map_or(p, |b| b.union(p)));
                    }
                });
            }
            b
        })
        .reduce_with(BBox::union)
}

/// Call `f(x, value)` for every non-zero voxel of a row, skipping zero words.
#[inline]
fn scan_row(row: &[u8], mut f: impl FnMut(usize, u8)) {
    let (words, tail) = row.split_at(row.len() / 8 * 8);
    // Most rows of a CT label map are background: one vectorisable OR decides.
    let any = words.chunks_exact(8).fold(0u64, |a, w| {
        a | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
    }) | tail.iter().fold(0u64, |a, &v| a | u64::from(v));
    if any == 0 {
        return;
    }
    for (c, w) in words.chunks_exact(8).enumerate() {
        if u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0 {
            continue;
        }
        for (b, &v) in w.iter().enumerate() {
            if v != 0 {
                f(c * 8 + b, v);
            }
        }
    }
    for (b, &v) in tail.iter().enumerate() {
        if v != 0 {
            f(words.len() + b, v);
        }
    }
}

/// `label` inside `bbox` as a 0/1 mask with a one-voxel zero border on every side:
/// dims `bbox.dims() + 2`, index `x + px * (y + py * z)` with the box's `lo` at `(1, 1, 1)`.
/// The border stands for "outside the box", which is background for a box that holds the
/// whole mask, and "outside the array counts as background" (METRICS.md) for a box that
/// touches the array's edge.
pub fn padded_mask(vol: &LabelVolume, label: u8, bbox: &BBox) -> Vec<u8> {
    let [nx, ny, _] = vol.geom.dims;
    let [bx, by, bz] = bbox.dims();
    let (px, py, pz) = (bx + 2, by + 2, bz + 2);
    let mut m = vec![0u8; px * py * pz];
    for z in 0..bz {
        for y in 0..by {
            let src = bbox.lo[0] + nx * (bbox.lo[1] + y + ny * (bbox.lo[2] + z));
            let dst = 1 + px * (y + 1 + py * (z + 1));
            for (d, &s) in m[dst..dst + bx].iter_mut().zip(&vol.data[src..src + bx]) {
                *d = u8::from(s == label);
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{Geometry, Volume};

    #[test]
    fn boxes_of_all_labels_in_one_scan() {
        let dims = [19, 5, 4];
        let mut data = vec![0u8; 19 * 5 * 4];
        let at = |x: usize, y: usize, z: usize| x + 19 * (y + 5 * z);
        data[at(0, 0, 0)] = 3;
        data[at(18, 4, 3)] = 3;
        data[at(9, 2, 1)] = 7;
        data[at(17, 1, 2)] = 7;
        let v = Volume {
            geom: Geometry::axis_aligned(dims, [1.0; 3], [0.0; 3]),
            data,
        };
        let b = label_boxes(&v);
        assert_eq!(
            b[3],
            Some(BBox {
                lo: [0, 0, 0],
                hi: [18, 4, 3]
            })
        );
        assert_eq!(
            b[7],
            Some(BBox {
                lo: [9, 1, 1],
                hi: [17, 2, 2]
            })
        );
        assert_eq!(b[1], None);
        assert_eq!(label_box(&v, 7), b[7]);
        assert_eq!(label_box(&v, 1), None);
        let m = padded_mask(&v, 7, b[7].as_ref().unwrap());
        // box 9x2x2 -> padded 11x4x4; (9,2,1) is box (0,1,0) -> padded (1,2,1)
        assert_eq!(m.len(), 11 * 4 * 4);
        assert_eq!(m[1 + 11 * (2 + 4)], 1);
        assert_eq!(m.iter().filter(|&&v| v == 1).count(), 2);
    }
}
