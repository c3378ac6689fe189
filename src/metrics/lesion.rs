//! Lesion-wise detection for classes marked `lesion = true` (METRICS.md "Lesions"):
//! 26-connected components of the reference and the predicted mask, components smaller
//! than `min_lesion_mm3` dropped from both, one-to-one matching that maximises the total
//! IoU (Hungarian) among pairs that qualify (at least one common voxel when the threshold
//! is 0, else IoU >= threshold), then lesion TP/FP/FN, precision, recall, F1 (= panoptica
//! RQ), mean Dice of the matched pairs and one row per lesion.
//!
//! Components are found with union-find on the union bounding box only. The qualifying
//! pairs form a bipartite graph that is split into connected blocks before matching, so
//! the Hungarian matrices stay as small as the clusters of touching lesions, however many
//! lesions (or speckles) a case has.

use std::collections::HashMap;

use super::crop::{self, BBox};
use super::hungarian;
use super::{LesionMetrics, LesionRow};
use crate::volume::LabelVolume;

/// Lesion detection of `label` in `reference` vs `prediction` (same grid). Scans both
/// volumes for the label's boxes; [`compute_boxed`] takes boxes already known.
pub fn compute(
    reference: &LabelVolume,
    prediction: &LabelVolume,
    label: u8,
    min_lesion_mm3: f64,
    iou_threshold: f64,
) -> LesionMetrics {
    let (r, p) = rayon::join(
        || crop::label_box(reference, label),
        || crop::label_box(prediction, label),
    );
    compute_boxed(
        reference,
        prediction,
        label,
        min_lesion_mm3,
        iou_threshold,
        r,
        p,
    )
}

/// Connected components of one mask inside the box.
struct Components {
    /// Component id per padded voxel (0 = none / dropped), ids 1..=n in scan order.
    id: Vec<u32>,
    /// Voxel count per id (index id - 1).
    size: Vec<u64>,
    /// Sum of voxel coordinates (whole-volume indices) per id, for centroids.
    sum: Vec<[f64; 3]>,
}

/// [`compute`] with the label's bounding box in each volume given (`None` = absent).
pub fn compute_boxed(
    reference: &LabelVolume,
    prediction: &LabelVolume,
    label: u8,
    min_lesion_mm3: f64,
    iou_threshold: f64,
    reference_box: Option<BBox>,
    prediction_box: Option<BBox>,
) -> LesionMetrics {
    let voxel_mm3 = reference.geom.voxel_mm3();
    let Some(bbox) = BBox::union_opt(reference_box, prediction_box) else {
        return finish(Vec::new(), Vec::new(), &[]);
    };
    let dims = bbox.dims();
    let min_voxels = if min_lesion_mm3 > 0.0 && voxel_mm3 > 0.0 {
        min_lesion_mm3 / voxel_mm3
    } else {
        0.0
    };
    let (cr, cp) = rayon::join(
        || {
            let m = crop::padded_mask(reference, label, &bbox);
            components(&m, dims, bbox.lo, min_voxels)
        },
        || {
            let m = crop::padded_mask(prediction, label, &bbox);
            components(&m, dims, bbox.lo, min_voxels)
        },
    );
    // Common voxels per (reference id, prediction id).
    let mut inter: HashMap<(u32, u32), u64> = HashMap::new();
    for (&a, &b) in cr.id.iter().zip(&cp.id) {
        if a != 0 && b != 0 {
            *inter.entry((a, b)).or_insert(0) += 1;
        }
    }
    let nr = cr.size.len();
    let np = cp.size.len();
    let mut edges: Vec<(u32, u32, f64)> = inter
        .iter()
        .filter_map(|(&(a, b), &n)| {
            let union = cr.size[a as usize - 1] + cp.size[b as usize - 1] - n;
            let iou = n as f64 / union as f64;
            let qualifies = if iou_threshold > 0.0 {
                iou >= iou_threshold
            } else {
                n >= 1
            };
            qualifies.then_some((a, b, iou))
        })
        .collect();
    edges.sort_by_key(|e| (e.0, e.1));
    let pairs: Vec<(u32, u32, f64)> = match_blocks(nr, np, &edges)
        .into_iter()
        .map(|(a, b, _)| {
            // Dice from the counts (exact), not from the IoU.
            let n = inter[&(a, b)];
            let dice = 2.0 * n as f64 / (cr.size[a as usize - 1] + cp.size[b as usize - 1]) as f64;
            (a, b, dice)
        })
        .collect();
    let rows_r = rows(&cr, "reference", voxel_mm3);
    let rows_p = rows(&cp, "prediction", voxel_mm3);
    finish(rows_r, rows_p, &pairs)
}

/// 26-connected components of a padded 0/1 mask (see [`crop::padded_mask`]) whose box
/// starts at `lo` in the volume; components under `min_voxels` are dropped and the rest
/// renumbered 1..=n in scan order of their first voxel.
fn components(m: &[u8], dims: [usize; 3], lo: [usize; 3], min_voxels: f64) -> Components {
    let [bx, by, bz] = dims;
    let (px, py) = (bx + 2, by + 2);
    // The 13 neighbours already visited in scan order (z, then y, then x).
    let mut back: Vec<usize> = Vec::with_capacity(13);
    for dz in -1i64..=0 {
        for dy in -1i64..=1 {
            for dx in -1i64..=1 {
                let earlier = dz < 0 || (dz == 0 && (dy < 0 || (dy == 0 && dx < 0)));
                if earlier {
                    back.push((-(dx + px as i64 * (dy + py as i64 * dz))) as usize);
                }
            }
        }
    }
    let mut id = vec![0u32; m.len()];
    let mut parent: Vec<u32> = vec![0]; // provisional labels 1.., parent[0] unused
    fn find(parent: &mut [u32], mut a: u32) -> u32 {
        while parent[a as usize] != a {
            let g = parent[parent[a as usize] as usize];
            parent[a as usize] = g;
            a = g;
        }
        a
    }
    for z in 1..=bz {
        for y in 1..=by {
            let row = px * (y + py * z);
            for i in row + 1..=row + bx {
                if m[i] == 0 {
                    continue;
                }
                let mut mine = 0u32;
                for &off in &back {
                    let n = id[i - off];
                    if n == 0 {
                        continue;
                    }
                    if mine == 0 {
                        mine = find(&mut parent, n);
                    } else {
                        let (a, b) = (find(&mut parent, mine), find(&mut parent, n));
                        if a != b {
                            // keep the smaller (earlier) root: ids follow first voxels
                            let (lo_r, hi_r) = (a.min(b), a.max(b));
                            parent[hi_r as usize] = lo_r;
                            mine = lo_r;
                        }
                    }
                }
                if mine == 0 {
                    mine = parent.len() as u32;
                    parent.push(mine);
                }
                id[i] = mine;
            }
        }
    }
    // Resolve roots; count sizes and coordinate sums per root.
    let n_prov = parent.len();
    let mut size = vec![0u64; n_prov];
    let mut sum = vec![[0.0f64; 3]; n_prov];
    for z in 1..=bz {
        for y in 1..=by {
            let row = px * (y + py * z);
            for x in 1..=bx {
                let i = row + x;
                if id[i] == 0 {
                    continue;
                }
                let r = find(&mut parent, id[i]);
                id[i] = r;
                size[r as usize] += 1;
                let s = &mut sum[r as usize];
                s[0] += (lo[0] + x - 1) as f64;
                s[1] += (lo[1] + y - 1) as f64;
                s[2] += (lo[2] + z - 1) as f64;
            }
        }
    }
    // Roots in increasing order are components in order of their first voxel.
    let mut final_id = vec![0u32; n_prov];
    let mut out_size = Vec::new();
    let mut out_sum = Vec::new();
    for r in 1..n_prov {
        if size[r] > 0 && size[r] as f64 >= min_voxels {
            out_size.push(size[r]);
            out_sum.push(sum[r]);
            final_id[r] = out_size.len() as u32;
        }
    }
    for v in id.iter_mut() {
        if *v != 0 {
            *v = final_id[*v as usize];
        }
    }
    Components {
        id,
        size: out_size,
        sum: out_sum,
    }
}

/// Matched pairs `(reference id, prediction id, IoU, common voxels)` of a one-to-one
/// assignment maximising total IoU over qualifying `edges` (sorted by ids).
fn match_blocks(nr: usize, np: usize, edges: &[(u32, u32, f64)]) -> Vec<(u32, u32, f64)> {
    // Blocks = connected components of the bipartite graph (nodes: refs 0..nr, preds nr..).
    let mut parent: Vec<usize> = (0..nr + np).collect();
    fn find(p: &mut [usize], mut a: usize) -> usize {
        while p[a] != a {
            p[a] = p[p[a]];
            a = p[a];
        }
        a
    }
    for &(a, b, _) in edges {
        let (x, y) = (
            find(&mut parent, a as usize - 1),
            find(&mut parent, nr + b as usize - 1),
        );
        if x != y {
            parent[x.max(y)] = x.min(y);
        }
    }
    let mut blocks: HashMap<usize, Vec<(u32, u32, f64)>> = HashMap::new();
    for &e in edges {
        let root = find(&mut parent, e.0 as usize - 1);
        blocks.entry(root).or_default().push(e);
    }
    let mut keys: Vec<usize> = blocks.keys().copied().collect();
    keys.sort_unstable();
    let mut pairs = Vec::new();
    for k in keys {
        let block = &blocks[&k];
        let mut refs: Vec<u32> = block.iter().map(|e| e.0).collect();
        let mut preds: Vec<u32> = block.iter().map(|e| e.1).collect();
        refs.sort_unstable();
        refs.dedup();
        preds.sort_unstable();
        preds.dedup();
        if block.len() == 1 {
            pairs.push(block[0]);
            continue;
        }
        // Rows = the smaller side; cost = -IoU on qualifying pairs, 0 elsewhere (an
        // assignment through a zero cell is no match).
        let transpose = refs.len() > preds.len();
        let (rows, cols) = if transpose {
            (&preds, &refs)
        } else {
            (&refs, &preds)
        };
        let mut cost = vec![0.0f64; rows.len() * cols.len()];
        let pos = |v: &Vec<u32>, x: u32| v.binary_search(&x).expect("id is in its block");
        for &(a, b, iou) in block {
            let (r, c) = if transpose {
                (pos(rows, b), pos(cols, a))
            } else {
                (pos(rows, a), pos(cols, b))
            };
            cost[r * cols.len() + c] = -iou;
        }
        let assigned = hungarian::assign_min(&cost, rows.len(), cols.len());
        for (r, &c) in assigned.iter().enumerate() {
            if cost[r * cols.len() + c] < 0.0 {
                let (a, b) = if transpose {
                    (cols[c], rows[r])
                } else {
                    (rows[r], cols[c])
                };
                pairs.push((a, b, -cost[r * cols.len() + c]));
            }
        }
    }
    pairs.sort_by_key(|e| (e.0, e.1));
    pairs
}

fn rows(c: &Components, source: &'static str, voxel_mm3: f64) -> Vec<LesionRow> {
    c.size
        .iter()
        .zip(&c.sum)
        .enumerate()
        .map(|(i, (&n, s))| LesionRow {
            source,
            id: i as u32 + 1,
            volume_ml: n as f64 * voxel_mm3 / 1000.0,
            matched_with: None,
            dice: f64::NAN,
            centroid_vox: s.map(|v| v / n as f64),
        })
        .collect()
}

/// Metrics from the lesion rows of both maps and the matched `(reference id, prediction
/// id, Dice)` pairs.
fn finish(
    mut rows_r: Vec<LesionRow>,
    mut rows_p: Vec<LesionRow>,
    pairs: &[(u32, u32, f64)],
) -> LesionMetrics {
    let (nr, np) = (rows_r.len(), rows_p.len());
    let mut dice_sum = 0.0;
    for &(a, b, dice) in pairs {
        dice_sum += dice;
        let (ra, pb) = (&mut rows_r[a as usize - 1], &mut rows_p[b as usize - 1]);
        ra.matched_with = Some(b);
        ra.dice = dice;
        pb.matched_with = Some(a);
        pb.dice = dice;
    }
    let tp = pairs.len() as u32;
    let fp = np as u32 - tp;
    let fn_ = nr as u32 - tp;
    let ratio = |a: u32, b: u32| {
        if b == 0 {
            f64::NAN
        } else {
            f64::from(a) / f64::from(b)
        }
    };
    let mut lesions = rows_r;
    lesions.append(&mut rows_p);
    LesionMetrics {
        tp,
        fp,
        fn_,
        precision: ratio(tp, tp + fp),
        recall: ratio(tp, tp + fn_),
        f1: ratio(2 * tp, 2 * tp + fp + fn_),
        mean_matched_dice: if tp == 0 {
            f64::NAN
        } else {
            dice_sum / f64::from(tp)
        },
        lesions,
    }
}
