//! Special functions the tests need, in plain `f64`: log-gamma, the complementary error
//! function and the normal tail, the regularized incomplete beta function and its inverse,
//! and the binomial distribution function.
//!
//! Why not a crate: the workspace has none (no `libm`, no `statrs`), and the few functions
//! here are small, classical and checked against scipy to 1e-9 relative
//! (`tests/data/stats/reference.json`). Methods:
//! - `ln_gamma`: Lanczos approximation (g = 7, 9 coefficients, Godfrey), reflection below
//!   0.5; relative error about 1e-15.
//! - `erfc`: through the regularized upper incomplete gamma function, erfc(x) = Q(1/2, x^2),
//!   with Q by its continued fraction (modified Lentz) for x^2 >= 1.5 and P by its series
//!   otherwise; Gamma(1/2) = sqrt(pi) exactly, so no log-gamma error enters.
//! - `beta_inc`: the continued fraction of Numerical Recipes' `betacf` (modified Lentz),
//!   using I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges faster.
//! - `beta_inc_inv`, `beta_inc_inv_c`: bisection on the bit patterns of [0, 1] to adjacent
//!   floats (I is monotone), so it cannot diverge the way an unguarded Newton step can, and
//!   small quantiles keep full relative precision.

use std::f64::consts::PI;

/// Whether `v` is a positive number (NaN is not).
fn positive(v: f64) -> bool {
    v > 0.0
}

/// Lanczos coefficients, g = 7, n = 9 (P. Godfrey), as used by many libraries.
const LANCZOS_G: f64 = 7.0;
// Kept digit for digit as published, so they can be checked against the source.
#[allow(clippy::excessive_precision)]
const LANCZOS: [f64; 9] = [
    0.999_999_999_999_809_93,
    676.520_368_121_885_1,
    -1_259.139_216_722_402_8,
    771.323_428_777_653_13,
    -176.615_029_162_140_59,
    12.507_343_278_686_905,
    -0.138_571_095_265_720_12,
    9.984_369_578_019_571_6e-6,
    1.505_632_735_149_311_6e-7,
];

/// ln |Gamma(x)| for x > 0 (NaN for x <= 0: not needed here).
pub fn ln_gamma(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 {
        return f64::NAN;
    }
    if x < 0.5 {
        // Reflection: Gamma(x) Gamma(1 - x) = pi / sin(pi x).
        return (PI / (PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = LANCZOS[0];
    let t = x + LANCZOS_G + 0.5;
    for (i, c) in LANCZOS.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// ln B(a, b) = ln Gamma(a) + ln Gamma(b) - ln Gamma(a + b).
pub fn ln_beta(a: f64, b: f64) -> f64 {
    ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b)
}

const EPS: f64 = 1e-16;
const TINY: f64 = 1e-300;
const MAX_ITER: usize = 100_000;

/// erfc(x) = Q(1/2, x^2) for x >= 0, as (P, Q).
fn gamma_half_pq(x2: f64) -> (f64, f64) {
    let a = 0.5;
    // x^a e^-x / Gamma(a) with Gamma(1/2) = sqrt(pi).
    let front = (-x2).exp() * x2.sqrt() / PI.sqrt();
    if x2 < a + 1.0 {
        // Series: P(a, x) = front * sum x^n / (a (a+1) ... (a+n)).
        let mut term = 1.0 / a;
        let mut sum = term;
        for n in 1..MAX_ITER {
            term *= x2 / (a + n as f64);
            sum += term;
            if term.abs() < sum.abs() * EPS {
                break;
            }
        }
        let p = front * sum;
        (p, 1.0 - p)
    } else {
        // Continued fraction for Q (modified Lentz).
        let mut b = x2 + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..MAX_ITER {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < EPS {
                break;
            }
        }
        let q = front * h;
        (1.0 - q, q)
    }
}

/// The complementary error function.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    gamma_half_pq(x * x).1
}

/// The upper tail of the standard normal distribution, P(Z > z).
pub fn norm_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Continued fraction of the incomplete beta function (Numerical Recipes `betacf`).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..MAX_ITER {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < EPS {
            break;
        }
    }
    h
}

/// The regularized incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1]
/// (scipy.special.betainc); NaN outside that domain.
pub fn beta_inc(a: f64, b: f64, x: f64) -> f64 {
    if !positive(a) || !positive(b) || !(0.0..=1.0).contains(&x) {
        return f64::NAN;
    }
    if x == 0.0 {
        return 0.0;
    }
    if x == 1.0 {
        return 1.0;
    }
    let front = (a * x.ln() + b * (-x).ln_1p() - ln_beta(a, b)).exp();
    // The fraction converges fast for x < (a + 1) / (a + b + 2); otherwise use the symmetry.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, 1.0 - x) / b
    }
}

/// The complement 1 - I_x(a, b), computed without cancellation where it is small.
pub fn beta_inc_c(a: f64, b: f64, x: f64) -> f64 {
    if !(0.0..=1.0).contains(&x) {
        return f64::NAN;
    }
    beta_inc(b, a, 1.0 - x)
}

/// The x in [0, 1] with I_x(a, b) = p (scipy.stats.beta.ppf(p, a, b)); NaN outside the
/// domain.
pub fn beta_inc_inv(a: f64, b: f64, p: f64) -> f64 {
    if !positive(a) || !positive(b) || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    // Compare a small target with the small tail (I or 1 - I), never with 1 minus it:
    // 1 - p is exact for p > 1/2 (Sterbenz), 1 - I(x) near 1 is not.
    if p <= 0.5 {
        bisect(|x| beta_inc(a, b, x) - p)
    } else {
        bisect(|x| (1.0 - p) - beta_inc_c(a, b, x))
    }
}

/// The x in [0, 1] with 1 - I_x(a, b) = q (scipy.stats.beta.isf(q, a, b)); NaN outside
/// the domain.
pub fn beta_inc_inv_c(a: f64, b: f64, q: f64) -> f64 {
    if !positive(a) || !positive(b) || !(0.0..=1.0).contains(&q) {
        return f64::NAN;
    }
    if q <= 0.5 {
        bisect(|x| q - beta_inc_c(a, b, x))
    } else {
        bisect(|x| beta_inc(a, b, x) - (1.0 - q))
    }
}

/// The root in [0, 1] of an increasing `f` with f(0) <= 0 <= f(1), by bisection on the bit
/// patterns of the non-negative floats (ordered as their integers): at most 62 steps, ending
/// on adjacent floats, so small roots get full relative precision too.
fn bisect(f: impl Fn(f64) -> f64) -> f64 {
    let (mut lo, mut hi) = (0u64, 1f64.to_bits());
    if f(0.0) >= 0.0 {
        return 0.0;
    }
    if f(1.0) < 0.0 {
        return 1.0;
    }
    // Invariant: f(lo) < 0 <= f(hi).
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if f(f64::from_bits(mid)) < 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (l, h) = (f64::from_bits(lo), f64::from_bits(hi));
    if f(l).abs() < f(h).abs() {
        l
    } else {
        h
    }
}

/// P(X <= k) for X ~ Binomial(n, p) (scipy.stats.binom.cdf): exact integer sums for p = 1/2
/// and n <= 120, otherwise I_{1-p}(n - k, k + 1).
pub fn binom_cdf(k: u64, n: u64, p: f64) -> f64 {
    if k >= n {
        return 1.0;
    }
    if p == 0.5 && n <= 120 {
        // Exactly, for the small tables McNemar sees most: sum C(n, i) over i <= k in
        // integers (2^120 fits in u128), one rounding at the end.
        let mut c: u128 = 1;
        let mut sum: u128 = 1;
        for i in 1..=k {
            c = c * u128::from(n - i + 1) / u128::from(i);
            sum += c;
        }
        return sum as f64 / (n as f64).exp2();
    }
    beta_inc(
        (n - k) as f64,
        (k + 1) as f64,
        1.0 - p, // exact for p = 1/2, the only p McNemar uses
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn textbook_values() {
        // Gamma(5) = 24; Gamma(1/2) = sqrt(pi).
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-14);
        assert!((ln_gamma(0.5) - PI.sqrt().ln()).abs() < 1e-14);
        // erfc(0) = 1, P(Z > 1.959963984540054) = 0.025.
        assert!((erfc(0.0) - 1.0).abs() < 1e-15);
        assert!((norm_sf(1.959_963_984_540_054) - 0.025).abs() < 1e-15);
        // I_x(1, 1) = x; I_x(a, 1) = x^a.
        assert!((beta_inc(1.0, 1.0, 0.3) - 0.3).abs() < 1e-15);
        assert!((beta_inc(3.0, 1.0, 0.5) - 0.125).abs() < 1e-15);
        assert!((beta_inc_inv(3.0, 1.0, 0.125) - 0.5).abs() < 1e-15);
        // P(X <= 1), X ~ Bin(3, 1/2) = 4/8.
        assert!((binom_cdf(1, 3, 0.5) - 0.5).abs() < 1e-15);
    }
}
