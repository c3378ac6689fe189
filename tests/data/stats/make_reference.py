#!/usr/bin/env python3
"""Peer numbers for evald's statistics (src/stats): scipy and statsmodels on generated inputs.

Run: python3 -m venv /tmp/statsvenv && /tmp/statsvenv/bin/pip install scipy statsmodels numpy
     /tmp/statsvenv/bin/python tests/data/stats/make_reference.py > tests/data/stats/reference.json

Inputs come from numpy's PCG64 with fixed seeds, so the file is reproducible; the versions
that computed the numbers are recorded under "provenance". evald's tests read this file and
compare to 1e-9 (relative for p-values and quantiles, see src/stats/tests.rs).

For each Wilcoxon case the p-value of the default call, scipy.stats.wilcoxon(x, y) (or with
correction=True), is stored with the p-values of each explicit method ('exact', 'asymptotic',
the enumerated PermutationMethod); "auto_is" names the explicit methods that give the
same p-value as 'auto', so the test checks evald's method choice against scipy's behaviour,
not against a copy of its rule.
"""
import json
import math
import platform
import sys
import warnings

import numpy as np
import scipy
import scipy.special as sp
import scipy.stats as st
import statsmodels
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

warnings.simplefilter("ignore")


def fnum(v):
    v = float(v)
    return v if math.isfinite(v) else None


def wilcoxon_case(name, x, y, correction=False):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    auto = st.wilcoxon(x, y, correction=correction)
    out = {"name": name, "x": x.tolist(), "y": y.tolist(), "correction": correction,
           "p": fnum(auto.pvalue), "statistic": fnum(auto.statistic)}
    explicit = {}
    for m in ["exact", "asymptotic"]:
        try:
            explicit[m] = fnum(st.wilcoxon(x, y, correction=correction, method=m).pvalue)
        except Exception:  # noqa: BLE001 - a method scipy refuses is simply not listed
            pass
    if 2 <= len(x) <= 13:
        explicit["permutation"] = fnum(st.wilcoxon(
            x, y, correction=correction, method=st.PermutationMethod(n_resamples=9999)).pvalue)
    out["p_by_method"] = explicit
    out["auto_is"] = sorted(m for m, p in explicit.items()
                            if (p is None and out["p"] is None)
                            or (p is not None and out["p"] is not None
                                and abs(p - out["p"]) <= 1e-12 * max(1.0, abs(p))))
    return out


def main():
    rng = np.random.default_rng(20261202)
    w = []
    # Continuous values: no zeros, no ties.
    for n in [1, 2, 5, 10, 25, 50, 51, 120]:
        x = rng.normal(0.80, 0.05, n)
        y = x - rng.normal(0.01, 0.03, n)
        w.append(wilcoxon_case(f"continuous n={n}", x, y))
    # A strong effect: tiny exact and asymptotic p-values.
    x = rng.normal(0.8, 0.05, 20)
    w.append(wilcoxon_case("strong n=20", x + 0.1 + rng.uniform(0, 0.01, 20), x))
    x = rng.normal(0.8, 0.05, 300)
    w.append(wilcoxon_case("strong n=300", x + 0.05 + rng.uniform(0, 0.02, 300), x))
    # Dice-like values to 2 decimals: ties and zeros.
    for n, label in [(6, "ties"), (12, "ties"), (13, "ties"), (14, "ties"), (40, "ties"),
                     (300, "ties")]:
        x = np.round(rng.uniform(0.6, 0.95, n), 2)
        y = np.round(x - rng.normal(0.0, 0.02, n), 2)
        w.append(wilcoxon_case(f"{label} n={n}", x, y))
        if n >= 14:
            w.append(wilcoxon_case(f"{label} n={n} correction", x, y, correction=True))
    # Zeros without ties, zeros with ties.
    x = rng.normal(0.8, 0.05, 13)
    y = x - rng.normal(0.0, 0.03, 13)
    y[[2, 7]] = x[[2, 7]]
    w.append(wilcoxon_case("zeros n=13", x, y))
    x = rng.normal(0.8, 0.05, 60)
    y = x - rng.normal(0.01, 0.03, 60)
    y[:9] = x[:9]
    w.append(wilcoxon_case("zeros n=60", x, y))
    w.append(wilcoxon_case("zeros n=60 correction", x, y, correction=True))
    w.append(wilcoxon_case("one non-zero of 4", [0.5, 0.6, 0.7, 0.8], [0.5, 0.6, 0.7, 0.7]))
    w.append(wilcoxon_case("all tied magnitude n=8", [1, 2, 3, 4, 5, 6, 7, 8],
                           [0, 1, 4, 3, 4, 5, 6, 7]))
    # Every difference zero: scipy gives 1 (n <= 13) or NaN; evald says undefined.
    w.append(wilcoxon_case("all equal n=5", [0.7] * 5, [0.7] * 5))
    w.append(wilcoxon_case("all equal n=60", [0.7] * 60, [0.7] * 60))

    mc = []
    for b, c in [(0, 0), (1, 0), (0, 1), (5, 5), (3, 12), (0, 20), (7, 1), (100, 130),
                 (1000, 1100), (2, 40)]:
        r = mcnemar([[10, b], [c, 10]], exact=True)
        mc.append({"b": b, "c": c, "p": fnum(r.pvalue), "statistic": fnum(r.statistic)})

    cp = []
    for k, n in [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (1, 1000), (999, 1000),
                 (500, 1000), (17, 300), (0, 5000), (2500, 5000), (1, 2), (49, 50)]:
        for alpha in [0.05, 0.01]:
            lo, hi = proportion_confint(k, n, alpha=alpha, method="beta")
            cp.append({"count": k, "nobs": n, "alpha": alpha, "low": fnum(lo), "high": fnum(hi)})

    special = {
        "gammaln": [[x, fnum(sp.gammaln(x))] for x in
                    [0.1, 0.5, 1.0, 1.5, 2.5, 7.0, 10.3, 100.0, 1234.5, 50000.0]],
        "norm_sf": [[z, fnum(st.norm.sf(z))] for z in
                    [0.0, 0.1, 0.5, 1.0, 1.2247, 1.959963984540054, 3.0, 5.0, 8.0, 12.0, 20.0,
                     30.0, 37.5]],
        "betainc": [[a, b, x, fnum(sp.betainc(a, b, x))] for a, b, x in
                    [(0.5, 0.5, 0.3), (1, 1, 0.42), (2, 3, 0.4), (10, 5, 0.7), (5, 10, 0.7),
                     (1, 1000, 0.001), (1000, 1, 0.999), (300, 700, 0.31), (17, 284, 0.05),
                     (2500, 2501, 0.5), (0.2, 30, 1e-4), (50, 50, 0.01)]],
        "beta_ppf": [[a, b, q, fnum(st.beta.ppf(q, a, b))] for a, b, q in
                     [(2, 3, 0.025), (2, 3, 0.975), (1, 1000, 0.025), (1000, 1, 0.975),
                      (17, 284, 0.005), (0.5, 0.5, 0.5), (300, 700, 0.9)]],
        "beta_isf": [[a, b, q, fnum(st.beta.isf(q, a, b))] for a, b, q in
                     [(2, 3, 0.025), (4, 998, 0.025), (1000, 2, 0.005), (0.5, 0.5, 0.3)]],
    }

    doc = {
        "provenance": {
            "script": "tests/data/stats/make_reference.py",
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "statsmodels": statsmodels.__version__,
            "seed": 20261202,
            "calls": {
                "wilcoxon": "scipy.stats.wilcoxon(x, y, correction=<case>) (zero_method='wilcox', "
                            "alternative='two-sided', method='auto'); d = x - y",
                "mcnemar": "statsmodels.stats.contingency_tables.mcnemar([[10, b], [c, 10]], exact=True)",
                "clopper_pearson": "statsmodels.stats.proportion.proportion_confint(count, nobs, alpha, method='beta')",
                "special": "scipy.special.gammaln, scipy.stats.norm.sf, scipy.special.betainc, "
                           "scipy.stats.beta.ppf(q, a, b), scipy.stats.beta.isf(q, a, b)",
            },
        },
        "wilcoxon": w,
        "mcnemar": mc,
        "clopper_pearson": cp,
        "special": special,
    }
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
