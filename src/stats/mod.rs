//! Inferential statistics for comparing evaluations and describing subgroups: pure
//! functions on numbers (no I/O, nothing of evald's types), each reproducing a named peer.
//!
//! - [`bootstrap_mean_ci`]: paired percentile-bootstrap CI of a mean difference (seeded
//!   [`rng::SplitMix64`], so the same input gives the same interval);
//! - [`wilcoxon`]: the Wilcoxon signed-rank test, two-sided, exactly as
//!   `scipy.stats.wilcoxon(d)` with its defaults (`zero_method="wilcox"`,
//!   `correction=False`, `method="auto"`) in scipy 1.17;
//! - [`mcnemar_exact`]: McNemar's exact test on the discordant pairs, as statsmodels'
//!   `mcnemar(table, exact=True)`;
//! - [`clopper_pearson`]: the exact binomial interval, as statsmodels'
//!   `proportion_confint(count, nobs, method="beta")`.
//!
//! The peers' numbers are stored in `tests/data/stats/reference.json` (made by
//! `tests/data/stats/make_reference.py`) and the tests compare to 1e-9. Undefined results
//! (no data, nothing differs) are `None`, never a panic or an invented number.

pub mod rng;
pub mod special;

use rng::SplitMix64;

/// Resamples of the paired bootstrap (as the per-class CIs of the report).
pub const BOOTSTRAP_RESAMPLES: usize = 2000;
/// The bootstrap's fixed seed: same differences, same interval.
pub const BOOTSTRAP_SEED: u64 = 0x5EED_C0DE_0013_0001;

/// Percentile with linear interpolation between closest ranks (numpy's default) of a
/// sorted, non-empty slice.
fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Two-sided percentile-bootstrap confidence interval of the mean of `d` (for a paired
/// comparison, the per-case differences): `resamples` times, draw n values of `d` with
/// replacement (indices from [`SplitMix64`] seeded with `seed`), take their mean; the
/// interval is the (1 - level)/2 and (1 + level)/2 percentiles of those means (linear
/// interpolation, numpy's default). Resampling the differences, not each side alone, is
/// what makes it paired.
///
/// `None` with fewer than two values, a non-finite value, `resamples` of 0 or a `level`
/// outside (0, 1): no interval can be said.
pub fn bootstrap_mean_ci(d: &[f64], level: f64, resamples: usize, seed: u64) -> Option<(f64, f64)> {
    let n = d.len();
    if n < 2 || resamples == 0 || !(level > 0.0 && level < 1.0) || d.iter().any(|v| !v.is_finite())
    {
        return None;
    }
    let mut rng = SplitMix64::new(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| d[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0 * 100.0;
    Some((
        percentile_sorted(&means, tail),
        percentile_sorted(&means, 100.0 - tail),
    ))
}

/// How [`wilcoxon`] computed its p-value (scipy 1.17's choice for `method="auto"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WilcoxonMethod {
    /// The exact null distribution of R+ (n <= 50 pairs, no zero, no tie).
    Exact,
    /// All 2^n sign flips enumerated with the tied ranks (n <= 13 with zeros or ties):
    /// scipy's deterministic `PermutationMethod`.
    Permutation,
    /// Normal approximation with the tie correction of the variance (n > 50, or zeros or
    /// ties with n > 13).
    Asymptotic,
}

/// The result of [`wilcoxon`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Wilcoxon {
    /// Pairs given (zeros included).
    pub n: usize,
    /// Of those, zero differences (dropped: `zero_method="wilcox"`).
    pub zeros: usize,
    /// Sum of the ranks of the positive differences (average ranks for ties).
    pub r_plus: f64,
    /// Sum of the ranks of the negative differences.
    pub r_minus: f64,
    /// How the p-value was computed.
    pub method: WilcoxonMethod,
    /// Two-sided p-value; `None` when every difference is zero (nothing to rank).
    pub p: Option<f64>,
}

/// Largest sample for the exact distribution (scipy: `method="auto"` uses it up to 50).
const EXACT_MAX_N: usize = 50;
/// Largest sample for the enumerated permutation test (scipy: 2^13 <= its 9999 resamples).
const PERMUTATION_MAX_N: usize = 13;

/// The Wilcoxon signed-rank test of the paired differences `d` (e.g. new - old per case),
/// two-sided, exactly as `scipy.stats.wilcoxon(d)` with its defaults in scipy 1.17
/// (`zero_method="wilcox"`, `method="auto"`; `correction` as given, scipy's default is
/// `false`):
/// - zero differences are dropped before ranking (`"wilcox"`); the absolute values of the
///   rest get average ranks (ties share the mean of their ranks);
/// - with n (all pairs, zeros included, as scipy counts) at most 50 and neither zeros nor
///   ties: the exact distribution of R+, p = 2 min(P(R+ >= r), P(R+ <= r)), at most 1;
/// - with zeros or ties and n <= 13: every one of the 2^n sign assignments enumerated
///   (scipy's permutation test, which is exact then), p = 2 min(share <= r, share >= r);
/// - otherwise the normal approximation: z = (R+ - m) / s with m = n'(n'+1)/4 and
///   s^2 = (n'(n'+1)(2n'+1) - sum(t^3 - t)/2) / 24 over the n' non-zero differences and the
///   sizes t of the groups of tied |d|; with `correction`, z moves 0.5/s towards 0;
///   p = 2 P(Z > |z|).
///
/// `None` for no pairs or a non-finite difference (the caller pairs defined values only).
pub fn wilcoxon(d: &[f64], correction: bool) -> Option<Wilcoxon> {
    if d.is_empty() || d.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let n = d.len();
    let nonzero: Vec<f64> = d.iter().copied().filter(|v| *v != 0.0).collect();
    let zeros = n - nonzero.len();
    let m = nonzero.len();
    // Average ranks of |d|, as doubled ranks (integers: a tie group spanning ranks i..j has
    // the average (i + j) / 2, so 2x it is i + j), and the tie-group sizes.
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| nonzero[a].abs().total_cmp(&nonzero[b].abs()));
    let mut rank2 = vec![0u64; m];
    let mut ties: Vec<u64> = Vec::new();
    let mut i = 0;
    while i < m {
        let mut j = i;
        while j + 1 < m && nonzero[order[j + 1]].abs() == nonzero[order[i]].abs() {
            j += 1;
        }
        for &k in &order[i..=j] {
            rank2[k] = (i + 1 + j + 1) as u64;
        }
        ties.push((j - i + 1) as u64);
        i = j + 1;
    }
    let has_ties = ties.iter().any(|&t| t > 1);
    let r_plus2: u64 = (0..m).filter(|&k| nonzero[k] > 0.0).map(|k| rank2[k]).sum();
    let r_minus2: u64 = (0..m).filter(|&k| nonzero[k] < 0.0).map(|k| rank2[k]).sum();
    let (r_plus, r_minus) = (r_plus2 as f64 / 2.0, r_minus2 as f64 / 2.0);
    let method = if n > EXACT_MAX_N {
        WilcoxonMethod::Asymptotic
    } else if !(has_ties || zeros > 0) {
        WilcoxonMethod::Exact
    } else if n <= PERMUTATION_MAX_N {
        WilcoxonMethod::Permutation
    } else {
        WilcoxonMethod::Asymptotic
    };
    let p = if m == 0 {
        // scipy answers 1 (permutation, n <= 13) or NaN (asymptotic: 0/0) here; with no
        // non-zero difference there is nothing to test, so evald says "undefined".
        None
    } else {
        Some(match method {
            WilcoxonMethod::Exact => exact_p(m, r_plus2 / 2),
            WilcoxonMethod::Permutation => permutation_p(&rank2, r_plus2),
            WilcoxonMethod::Asymptotic => {
                let mf = m as f64;
                let mean = mf * (mf + 1.0) * 0.25;
                let tie: f64 = ties.iter().map(|&t| (t * t * t - t) as f64).sum();
                let se = ((mf * (mf + 1.0) * (2.0 * mf + 1.0) - tie / 2.0) / 24.0).sqrt();
                let mut z = (r_plus - mean) / se;
                if correction {
                    z -= z.signum() * 0.5 / se;
                }
                (2.0 * special::norm_sf(z.abs())).min(1.0)
            }
        })
    };
    Some(Wilcoxon {
        n,
        zeros,
        r_plus,
        r_minus,
        method,
        p,
    })
}

/// Exact two-sided p of R+ = r among m untied non-zero differences: the distribution counts
/// the subsets of {1..m} by their sum (integers; 2^50 fits in u64).
fn exact_p(m: usize, r: u64) -> f64 {
    let max = m * (m + 1) / 2;
    let mut counts = vec![0u64; max + 1];
    counts[0] = 1;
    for k in 1..=m {
        for s in (k..=k * (k + 1) / 2).rev() {
            counts[s] += counts[s - k];
        }
    }
    let total = (1u128 << m) as f64;
    let r = r as usize;
    let le: u64 = counts[..=r.min(max)].iter().sum();
    let ge: u64 = counts[r.min(max)..].iter().sum();
    (2.0 * (le.min(ge) as f64) / total).min(1.0)
}

/// Two-sided p of the enumerated sign-flip test: the share of the 2^m sign assignments whose
/// R+ (doubled ranks, exact integers) is <= and >= the observed, twice the smaller, at most 1.
fn permutation_p(rank2: &[u64], observed2: u64) -> f64 {
    let m = rank2.len();
    let (mut le, mut ge) = (0u64, 0u64);
    for mask in 0u32..(1u32 << m) {
        let s: u64 = (0..m)
            .filter(|&k| mask & (1 << k) != 0)
            .map(|k| rank2[k])
            .sum();
        le += u64::from(s <= observed2);
        ge += u64::from(s >= observed2);
    }
    (2.0 * le.min(ge) as f64 / f64::from(1u32 << m)).min(1.0)
}

/// McNemar's exact test: two-sided p-value of `b` and `c` discordant pairs (one method right
/// where the other is wrong, each way) under Binomial(b + c, 1/2):
/// p = min(1, 2 P(X <= min(b, c))), as statsmodels' `mcnemar([[a, b], [c, d]], exact=True)`.
/// No discordant pair gives 1 (statsmodels too): nothing contradicts "no change".
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    (2.0 * special::binom_cdf(b.min(c), b + c, 0.5)).min(1.0)
}

/// The Clopper-Pearson ("exact") two-sided interval of a proportion `count / nobs` at
/// confidence 1 - `alpha`: the alpha/2 quantile of Beta(count, nobs - count + 1) and the
/// 1 - alpha/2 quantile of Beta(count + 1, nobs - count), with 0 and 1 at the ends, as
/// statsmodels' `proportion_confint(count, nobs, alpha, method="beta")`.
///
/// `None` for no observation, a count above `nobs` or `alpha` outside (0, 1).
pub fn clopper_pearson(count: u64, nobs: u64, alpha: f64) -> Option<(f64, f64)> {
    if nobs == 0 || count > nobs || !(alpha > 0.0 && alpha < 1.0) {
        return None;
    }
    let (k, n) = (count as f64, nobs as f64);
    let low = if count == 0 {
        0.0
    } else {
        special::beta_inc_inv(k, n - k + 1.0, alpha / 2.0)
    };
    let high = if count == nobs {
        1.0
    } else {
        special::beta_inc_inv_c(k + 1.0, n - k, alpha / 2.0)
    };
    Some((low, high))
}

#[cfg(test)]
mod tests;
