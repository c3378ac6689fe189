//! The statistics against their peers' stored numbers (`tests/data/stats/reference.json`:
//! scipy 1.17.1, statsmodels 0.15.0; see its provenance), and the bootstrap's coverage by
//! simulation.

use serde_json::Value;

use super::rng::SplitMix64;
use super::*;

fn reference() -> Value {
    serde_json::from_str(include_str!("../../tests/data/stats/reference.json"))
        .expect("reference.json parses")
}

/// Relative agreement to 1e-9 (absolute below 1e-300, where f64 underflows).
fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-9 * want.abs() || (got - want).abs() < 1e-300
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

#[test]
fn special_functions_match_scipy() {
    let r = reference();
    let s = &r["special"];
    for row in s["gammaln"].as_array().unwrap() {
        let v = floats(row);
        // Absolute near the zeros of ln Gamma (x = 1, 2): what exp() of it sees.
        let got = special::ln_gamma(v[0]);
        assert!(
            (got - v[1]).abs() <= 1e-9 * v[1].abs().max(1.0),
            "gammaln({}) = {got} vs {}",
            v[0],
            v[1]
        );
    }
    for row in s["norm_sf"].as_array().unwrap() {
        let v = floats(row);
        assert!(
            close(special::norm_sf(v[0]), v[1]),
            "norm.sf({}) = {:e} vs {:e}",
            v[0],
            special::norm_sf(v[0]),
            v[1]
        );
    }
    for row in s["betainc"].as_array().unwrap() {
        let v = floats(row);
        let got = special::beta_inc(v[0], v[1], v[2]);
        assert!(close(got, v[3]), "betainc{v:?}: {got:e}");
    }
    for row in s["beta_ppf"].as_array().unwrap() {
        let v = floats(row);
        let got = special::beta_inc_inv(v[0], v[1], v[2]);
        assert!(close(got, v[3]), "beta.ppf{v:?}: {got:e}");
    }
    for row in s["beta_isf"].as_array().unwrap() {
        let v = floats(row);
        let got = special::beta_inc_inv_c(v[0], v[1], v[2]);
        assert!(close(got, v[3]), "beta.isf{v:?}: {got:e}");
    }
}

#[test]
fn wilcoxon_matches_scipy_defaults_and_method_choice() {
    let r = reference();
    let cases = r["wilcoxon"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let (x, y) = (floats(&c["x"]), floats(&c["y"]));
        // d = x - y, the same float operation scipy does.
        let d: Vec<f64> = x.iter().zip(&y).map(|(a, b)| a - b).collect();
        let w = wilcoxon(&d, c["correction"].as_bool().unwrap()).expect("defined input");
        // scipy's statistic for two-sided: min(R+, R-).
        let stat = c["statistic"].as_f64().unwrap();
        assert!(
            close(w.r_plus.min(w.r_minus), stat),
            "{name}: statistic {w:?} vs {stat}"
        );
        let auto_is: Vec<&str> = c["auto_is"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        let ours = match w.method {
            WilcoxonMethod::Exact => "exact",
            WilcoxonMethod::Permutation => "permutation",
            WilcoxonMethod::Asymptotic => "asymptotic",
        };
        let all_zero = d.iter().all(|v| *v == 0.0);
        if all_zero {
            // Defined behaviour, stated: no non-zero difference, no p-value (scipy: 1 or NaN).
            assert_eq!(w.p, None, "{name}");
            continue;
        }
        assert!(
            auto_is.contains(&ours),
            "{name}: we chose {ours}, scipy's auto is {auto_is:?}"
        );
        let want = c["p"].as_f64().unwrap();
        let got = w.p.expect("p");
        assert!(close(got, want), "{name}: p {got:e} vs scipy {want:e}");
    }
}

#[test]
fn wilcoxon_refuses_what_it_cannot_rank() {
    assert_eq!(wilcoxon(&[], false), None);
    assert_eq!(wilcoxon(&[0.1, f64::NAN], false), None);
    let w = wilcoxon(&[0.0, 0.0], false).unwrap();
    assert_eq!((w.zeros, w.p), (2, None));
}

#[test]
fn mcnemar_matches_statsmodels_exact() {
    let r = reference();
    for c in r["mcnemar"].as_array().unwrap() {
        let (b, c2) = (c["b"].as_u64().unwrap(), c["c"].as_u64().unwrap());
        let want = c["p"].as_f64().unwrap();
        let got = mcnemar_exact(b, c2);
        assert!(close(got, want), "mcnemar({b}, {c2}) = {got:e} vs {want:e}");
    }
}

#[test]
fn clopper_pearson_matches_statsmodels_beta() {
    let r = reference();
    for c in r["clopper_pearson"].as_array().unwrap() {
        let (k, n) = (c["count"].as_u64().unwrap(), c["nobs"].as_u64().unwrap());
        let alpha = c["alpha"].as_f64().unwrap();
        let (lo, hi) = clopper_pearson(k, n, alpha).expect("defined");
        let (wl, wh) = (c["low"].as_f64().unwrap(), c["high"].as_f64().unwrap());
        assert!(
            close(lo, wl) && close(hi, wh),
            "CP({k}/{n}, {alpha}) = ({lo:e}, {hi:e}) vs ({wl:e}, {wh:e})"
        );
    }
    assert_eq!(clopper_pearson(0, 0, 0.05), None);
    assert_eq!(clopper_pearson(3, 2, 0.05), None);
}

/// A standard normal draw (Box-Muller) from the test's own generator.
fn normal(r: &mut SplitMix64) -> f64 {
    let u1 = 1.0 - r.unit(); // (0, 1]: ln is finite
    let u2 = r.unit();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[test]
fn bootstrap_ci_covers_a_known_mean_difference_about_95_percent_of_the_time() {
    // 1000 simulated paired studies of 100 cases: per case, a Dice-like "old" score and a
    // "new" one that is better by 0.02 on average, with case-to-case noise shared by both
    // (what pairing exploits) and a skewed per-case change (exponential, so the CI is not
    // only tested on symmetric data). True mean difference: 0.02.
    let (runs, n, delta) = (1000, 100, 0.02);
    let mut r = SplitMix64::new(42);
    let mut covered = 0;
    for run in 0..runs {
        let d: Vec<f64> = (0..n)
            .map(|_| {
                let case = 0.8 + 0.05 * normal(&mut r);
                // Exponential(mean 0.02) - 0.02 + 0.02 = change with mean 0.02, skewed.
                let change = -0.02 * (1.0 - r.unit()).ln() + 0.01 * normal(&mut r);
                let new = case + change - 0.02 + delta;
                new - case
            })
            .collect();
        let (lo, hi) =
            bootstrap_mean_ci(&d, 0.95, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED ^ run).unwrap();
        covered += usize::from(lo <= delta && delta <= hi);
    }
    let rate = covered as f64 / runs as f64;
    assert!((0.93..=0.97).contains(&rate), "coverage {rate}");
}

#[test]
fn bootstrap_ci_is_reproducible_and_undefined_below_two_pairs() {
    let d = [0.01, 0.03, -0.02, 0.05, 0.0, 0.02];
    let a = bootstrap_mean_ci(&d, 0.95, 500, 7).unwrap();
    assert_eq!(a, bootstrap_mean_ci(&d, 0.95, 500, 7).unwrap());
    assert!(a.0 < a.1 && a.0 >= -0.02 && a.1 <= 0.05);
    // All differences equal: the interval is that value.
    assert_eq!(bootstrap_mean_ci(&[0.5; 4], 0.95, 100, 1), Some((0.5, 0.5)));
    assert_eq!(bootstrap_mean_ci(&[0.5], 0.95, 100, 1), None);
    assert_eq!(bootstrap_mean_ci(&[], 0.95, 100, 1), None);
    assert_eq!(bootstrap_mean_ci(&[0.5, f64::NAN], 0.95, 100, 1), None);
}
