//! Optimal assignment (Hungarian / Kuhn-Munkres with potentials, O(n^2 m)) for the small,
//! dense cost matrices of lesion matching. The lesion module splits the overlap graph into
//! connected blocks first, so matrices stay small whatever the number of lesions.

/// Minimum-cost assignment of every row of the `rows x cols` matrix `cost` (row-major,
/// `rows <= cols`) to a distinct column. Returns `col_of_row`.
///
/// # Panics
/// Never for valid input; `rows > cols` or a wrong-sized `cost` are programming errors
/// (checked with `assert!`).
pub fn assign_min(cost: &[f64], rows: usize, cols: usize) -> Vec<usize> {
    assert!(rows <= cols, "assign_min needs rows <= cols");
    assert_eq!(cost.len(), rows * cols, "cost matrix size");
    if rows == 0 {
        return Vec::new();
    }
    let c = |i: usize, j: usize| cost[(i - 1) * cols + (j - 1)];
    // 1-based arrays with a virtual column 0 (e-maxx formulation).
    let mut u = vec![0.0f64; rows + 1];
    let mut v = vec![0.0f64; cols + 1];
    let mut p = vec![0usize; cols + 1]; // p[j] = row assigned to column j
    let mut way = vec![0usize; cols + 1];
    for i in 1..=rows {
        p[0] = i;
        let mut j0 = 0usize;
        let mut minv = vec![f64::INFINITY; cols + 1];
        let mut used = vec![false; cols + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0usize;
            for j in 1..=cols {
                if !used[j] {
                    let cur = c(i0, j) - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=cols {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut col_of_row = vec![0usize; rows];
    for j in 1..=cols {
        if p[j] != 0 {
            col_of_row[p[j] - 1] = j - 1;
        }
    }
    col_of_row
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(cost: &[f64], rows: usize, cols: usize) -> f64 {
        fn go(r: usize, rows: usize, cols: usize, used: &mut Vec<bool>, cost: &[f64]) -> f64 {
            if r == rows {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for j in 0..cols {
                if !used[j] {
                    used[j] = true;
                    best = best.min(cost[r * cols + j] + go(r + 1, rows, cols, used, cost));
                    used[j] = false;
                }
            }
            best
        }
        go(0, rows, cols, &mut vec![false; cols], cost)
    }

    #[test]
    fn optimal_on_small_random_matrices() {
        let mut s = 12345u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 33) % 1000) as f64 / 1000.0
        };
        for rows in 0..=5 {
            for cols in rows..=6 {
                for _ in 0..5 {
                    let cost: Vec<f64> = (0..rows * cols).map(|_| -rnd()).collect();
                    let a = assign_min(&cost, rows, cols);
                    let mut seen = vec![false; cols];
                    for &j in &a {
                        assert!(!seen[j], "column used twice");
                        seen[j] = true;
                    }
                    let total: f64 = a.iter().enumerate().map(|(i, &j)| cost[i * cols + j]).sum();
                    assert!((total - brute(&cost, rows, cols)).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn greedy_is_not_optimal_here_but_we_are() {
        // greedy on max IoU would take (0,0)=0.6 and leave row 1 with 0: total 0.6;
        // optimal is (0,1)+(1,0) = 0.5 + 0.5.
        let iou = [0.6, 0.5, 0.5, 0.0];
        let cost: Vec<f64> = iou.iter().map(|x| -x).collect();
        assert_eq!(assign_min(&cost, 2, 2), vec![1, 0]);
    }
}
