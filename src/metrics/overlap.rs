//! Voxel counting: one pass over a reference/prediction pair gives, per axial slice, a
//! compact confusion histogram over the evaluated classes. Everything overlap-based
//! (TP/FP/FN/TN, Dice, IoU, per-slice numbers, the voxel confusion matrix) derives from it,
//! exactly and in integers, so these numbers equal nnU-Net's bit for bit.
//!
//! Labels that are not evaluated classes fold into index 0 ("background / other"): that
//! keeps TN exact for every class (a voxel of an unlisted label is neither TP, FP nor FN).

use rayon::prelude::*;

/// Per-slice `k x k` histograms: `hist[z][r * k + p]` counts voxels of slice `z` whose
/// reference class index is `r` and prediction class index is `p`.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Number of class indices (evaluated classes + 1 for background/other).
    pub k: usize,
    /// One histogram per axial slice.
    pub hist: Vec<Vec<u32>>,
}

/// Build the label -> class-index table: `labels[i]` gets index `i + 1`, everything else 0.
pub fn class_lut(labels: &[u8]) -> [u8; 256] {
    let mut lut = [0u8; 256];
    for (i, &l) in labels.iter().enumerate() {
        if l != 0 {
            lut[l as usize] = (i + 1) as u8;
        }
    }
    lut
}

/// Voxels per label value (background runs are skipped 8 at a time, as in [`tally`]).
pub fn label_histogram(data: &[u8]) -> [u64; 256] {
    data.par_chunks(1 << 20)
        .map(|c| {
            let mut h = [0u64; 256];
            let (words, tail) = c.split_at(c.len() / 8 * 8);
            for w in words.chunks_exact(8) {
                if u64::from_ne_bytes(w.try_into().expect("8 bytes")) != 0 {
                    for &v in w {
                        h[v as usize] += 1;
                    }
                }
            }
            for &v in tail {
                h[v as usize] += 1;
            }
            h
        })
        .reduce(
            || [0u64; 256],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        )
}

/// Count `reference` against `prediction` (same length, `slice_len` voxels per slice).
pub fn tally(reference: &[u8], prediction: &[u8], slice_len: usize, labels: &[u8]) -> Tally {
    assert_eq!(
        reference.len(),
        prediction.len(),
        "volumes on the same grid"
    );
    let k = labels.len() + 1;
    let lut = class_lut(labels);
    let hist = reference
        .par_chunks(slice_len)
        .zip(prediction.par_chunks(slice_len))
        .map(|(r, p)| count_slice(r, p, &lut, k))
        .collect();
    Tally { k, hist }
}

fn count_slice(r: &[u8], p: &[u8], lut: &[u8; 256], k: usize) -> Vec<u32> {
    let mut h = vec![0u32; k * k];
    let mut zeros = 0u32;
    // Most CT voxels are background in both maps: skip 8 of them at a time.
    let (rc, rt) = r.split_at(r.len() / 8 * 8);
    let (pc, pt) = p.split_at(rc.len());
    for (rw, pw) in rc.chunks_exact(8).zip(pc.chunks_exact(8)) {
        let a = u64::from_ne_bytes(rw.try_into().expect("8 bytes"));
        let b = u64::from_ne_bytes(pw.try_into().expect("8 bytes"));
        if a | b == 0 {
            zeros += 8;
        } else {
            for i in 0..8 {
                let ri = lut[rw[i] as usize] as usize;
                let pi = lut[pw[i] as usize] as usize;
                h[ri * k + pi] += 1;
            }
        }
    }
    for (&a, &b) in rt.iter().zip(pt) {
        h[lut[a as usize] as usize * k + lut[b as usize] as usize] += 1;
    }
    h[0] += zeros;
    h
}

impl Tally {
    /// Sum of all slices (64-bit: a volume can exceed 2^32 voxels in principle).
    pub fn volume(&self) -> Vec<u64> {
        let mut v = vec![0u64; self.k * self.k];
        for h in &self.hist {
            for (a, &b) in v.iter_mut().zip(h) {
                *a += u64::from(b);
            }
        }
        v
    }
}

/// TP/FP/FN/TN of class index `ci` (>= 1) in a `k x k` histogram.
pub fn counts_of<T: Copy + Into<u64>>(h: &[T], k: usize, ci: usize) -> Counts {
    let at = |r: usize, p: usize| -> u64 { h[r * k + p].into() };
    let tp = at(ci, ci);
    let col: u64 = (0..k).map(|r| at(r, ci)).sum();
    let row: u64 = (0..k).map(|p| at(ci, p)).sum();
    let total: u64 = h.iter().map(|&v| v.into()).sum();
    Counts {
        tp,
        fp: col - tp,
        fn_: row - tp,
        // (total + tp) - (col + row): never underflows, unlike total - col - row + tp.
        tn: total + tp - col - row,
    }
}

/// Voxel counts for one class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Prediction and reference both the class.
    pub tp: u64,
    /// Prediction the class, reference not.
    pub fp: u64,
    /// Reference the class, prediction not.
    pub fn_: u64,
    /// Neither.
    pub tn: u64,
}

impl Counts {
    /// Voxels predicted as the class.
    pub fn n_pred(&self) -> u64 {
        self.tp + self.fp
    }
    /// Voxels of the class in the reference.
    pub fn n_ref(&self) -> u64 {
        self.tp + self.fn_
    }
    /// 2TP/(2TP+FP+FN); NaN when both masks are empty (nnU-Net).
    pub fn dice(&self) -> f64 {
        let d = 2 * self.tp + self.fp + self.fn_;
        if d == 0 {
            f64::NAN
        } else {
            2.0 * self.tp as f64 / d as f64
        }
    }
    /// TP/(TP+FP+FN); NaN when both masks are empty.
    pub fn iou(&self) -> f64 {
        let d = self.tp + self.fp + self.fn_;
        if d == 0 {
            f64::NAN
        } else {
            self.tp as f64 / d as f64
        }
    }
    /// TP/(TP+FN); NaN without reference voxels.
    pub fn sensitivity(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }
    /// TN/(TN+FP); NaN when every voxel is the class in the reference... and prediction.
    pub fn specificity(&self) -> f64 {
        ratio(self.tn, self.tn + self.fp)
    }
    /// TP/(TP+FP); NaN without predicted voxels.
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        f64::NAN
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_a_direct_count() {
        // 3 slices of 10 voxels; label 9 is not evaluated and folds into "other".
        let r: Vec<u8> = (0..30).map(|i| [0, 1, 2, 9, 0, 0][i % 6]).collect();
        let p: Vec<u8> = (0..30).map(|i| [0, 1, 1, 2, 9, 0, 0][i % 7]).collect();
        let t = tally(&r, &p, 10, &[1, 2]);
        let v = t.volume();
        for (ci, l) in [(1usize, 1u8), (2, 2)] {
            let c = counts_of(&v, t.k, ci);
            let tp = r
                .iter()
                .zip(&p)
                .filter(|(a, b)| **a == l && **b == l)
                .count() as u64;
            let fp = r
                .iter()
                .zip(&p)
                .filter(|(a, b)| **a != l && **b == l)
                .count() as u64;
            let fn_ = r
                .iter()
                .zip(&p)
                .filter(|(a, b)| **a == l && **b != l)
                .count() as u64;
            assert_eq!(
                c,
                Counts {
                    tp,
                    fp,
                    fn_,
                    tn: 30 - tp - fp - fn_
                }
            );
        }
        let s1 = counts_of(&t.hist[1], t.k, 1);
        let tp1 = (10..20).filter(|&i| r[i] == 1 && p[i] == 1).count() as u64;
        assert_eq!(s1.tp, tp1);
    }

    #[test]
    fn a_class_covering_most_of_the_volume_does_not_underflow() {
        let r = vec![1u8; 100];
        let mut p = vec![1u8; 100];
        p[0] = 0;
        let t = tally(&r, &p, 10, &[1]);
        let c = counts_of(&t.volume(), t.k, 1);
        assert_eq!(
            c,
            Counts {
                tp: 99,
                fp: 0,
                fn_: 1,
                tn: 0
            }
        );
    }

    #[test]
    fn empty_conventions() {
        let both_empty = Counts {
            tp: 0,
            fp: 0,
            fn_: 0,
            tn: 10,
        };
        assert!(both_empty.dice().is_nan() && both_empty.iou().is_nan());
        let pure_fp = Counts {
            tp: 0,
            fp: 3,
            fn_: 0,
            tn: 7,
        };
        assert_eq!(pure_fp.dice(), 0.0);
        assert_eq!(pure_fp.iou(), 0.0);
        assert!(pure_fp.sensitivity().is_nan());
    }
}
