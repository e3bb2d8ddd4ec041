"""python -m scaling.benchmark_fits [--bootstrap N]: how long the fits take on a synthetic IsoFLOP sweep (5 budgets x 6
model sizes from Chinchilla's law, 0.5% noise): the figure BENCHMARKS.md quotes."""

import argparse
import os
import time

import numpy as np
import pandas as pd

from scaling import fits as F
from scaling.analyze import analyze
from scaling.collect import COLUMNS

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022, eq. 10


def synthetic_sweep(budgets=(1e18, 1e19, 1e20, 1e21, 1e22), per_budget=6, noise=0.005, seed=0,
                    law=CHINCHILLA) -> pd.DataFrame:
    """A table as collect() makes it: at each budget C, N spread over e^-1.5..e^1.5 times the law's optimum,
    D = C / 6N, loss = E + A / N^alpha + B / D^beta times lognormal noise of relative size `noise`."""
    E, A, B, alpha, beta = (law[k] for k in ("E", "A", "B", "alpha", "beta"))
    rng = np.random.default_rng(seed)
    c = np.repeat(np.array(budgets, dtype=float), per_budget)
    optimum = (alpha * A / (beta * B)) ** (1 / (alpha + beta)) * (c / 6) ** (beta / (alpha + beta))
    n = optimum * np.exp(np.tile(np.linspace(-1.5, 1.5, per_budget), len(budgets)))
    d = c / (6 * n)
    loss = (E + A / n ** alpha + B / d ** beta) * np.exp(rng.normal(0, noise, n.size))
    table = pd.DataFrame({"run": [f"synthetic{i}" for i in range(n.size)], "N": n, "D": d, "C": c, "budget": c,
                          "loss": loss})
    return table.reindex(columns=COLUMNS)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m scaling.benchmark_fits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    table = synthetic_sweep()
    log_n, log_d, log_l = (np.log(table[c].to_numpy()) for c in ("N", "D", "loss"))

    start = time.perf_counter()
    theta = F.fit_parametric(log_n, log_d, log_l)
    point = time.perf_counter() - start
    start = time.perf_counter()
    F.bootstrap(lambda i: F.fit_parametric(log_n[i], log_d[i], log_l[i], start=theta), [np.arange(len(table))],
                args.bootstrap, np.random.default_rng(0))
    resamples = time.perf_counter() - start
    start = time.perf_counter()
    analyze(table, args.bootstrap, seed=0, budget=1e23)
    total = time.perf_counter() - start

    print(f"{len(table)} points, {args.bootstrap} bootstrap resamples, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"  parametric point fit ({F.N_STARTS} L-BFGS runs from the grid): {point:.2f} s")
    print(f"  parametric bootstrap ({args.bootstrap} warm-started L-BFGS runs): {resamples:.2f} s")
    print(f"  everything analyze() fits (parametric, IsoFLOP, frontier, holdout, --budget): {total:.2f} s")


if __name__ == "__main__":
    main()
