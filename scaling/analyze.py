"""python -m scaling.analyze INPUT [INPUT ...] --out DIR [--budget FLOPS] [--bootstrap N] [--seed S]
[--n-column total|non_embedding|scaling]

INPUT: a sweep folder, run folders, or a CSV with columns N, D, loss (optionally C, core). Writes to DIR:
fits.json, table.csv, summary.md and the PNG plots. Every fitted value carries a 95% percentile
bootstrap interval; a section the data cannot support is left out with a note saying why.
"""

import argparse
import json
import math
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np

from nanochat.common import UserError
from scaling import fits as F
from scaling.collect import N_COLUMNS, collect, is_csv
from scaling.plots import draw_all
from scaling.summary import write_summary

MIN_PARAMETRIC = 8  # points for the 5-parameter law; fewer and the bootstrap mostly refits noise
BIN_DEX = 0.1  # bin width in log10 C when budgets must be found by binning continuous C
# a fit's JSON section, its point estimate and bootstrap samples (rows), kept for the holdout and --budget
Fit = namedtuple("Fit", "section point samples")


def analyze(table, n_boot: int = 1000, seed: int = 0, budget: float | None = None) -> dict:
    """fits.json's content from the table (which gains the isoflop_C column: the budget each point joins)."""
    notes = []
    k = float(np.median(table["C"] / (table["N"] * table["D"])))  # FLOPs per parameter per token, ~6
    table["isoflop_C"] = _isoflop_budgets(table, notes)
    rngs = [np.random.default_rng([seed, i]) for i in range(4)]  # one stream per section: each reproducible alone
    parametric = _parametric(table, n_boot, rngs[0], notes)
    isoflop = _isoflop(table, n_boot, rngs[1], notes)
    frontier = {key: fit for key in ("loss", "core") if (fit := _frontier(table, key, n_boot, rngs[2], notes))}
    results = {"parametric": parametric and parametric.section, "isoflop": isoflop and isoflop.section,
               "frontier": {key: fit.section for key, fit in frontier.items()} or None,
               "holdout": _holdout(table, parametric, isoflop, frontier, notes),
               "optimal": budget and _optimal(budget, k, table, parametric, isoflop, frontier.get("loss"), notes),
               "notes": notes, "inputs": {"flops_per_param_token": k}}
    return {key: value for key, value in results.items() if value is not None}


# --------------------------------------------------------------------------------------------- sections

def _parametric(table, n_boot, rng, notes) -> Fit | None:
    log_n, log_d, log_l = (np.log(table[c].to_numpy()) for c in ("N", "D", "loss"))
    if not _parametric_possible(log_n, log_d, notes, "parametric"):
        return None
    theta = F.fit_parametric(log_n, log_d, log_l)
    samples = F.bootstrap(lambda i: F.fit_parametric(log_n[i], log_d[i], log_l[i], start=theta),
                          [np.arange(len(table))], n_boot, rng)

    def derived(t):  # columns E, A, B, alpha, beta, and Chinchilla's a = beta / (alpha + beta), b = 1 - a
        a, b, e, alpha, beta = np.atleast_2d(t).T
        exponents = [beta / (alpha + beta), alpha / (alpha + beta)]
        return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta, *exponents], -1)

    names = ["E", "A", "B", "alpha", "beta", "a", "b"]
    return Fit({**_estimates(names, derived(theta)[0], derived(samples)), "n_points": len(table),
                "form": "loss = E + A / N^alpha + B / D^beta; N_opt ~ C^a, D_opt ~ C^b"}, theta, samples)


def _parametric_possible(log_n, log_d, notes, name) -> bool:
    if len(log_n) < MIN_PARAMETRIC:
        notes.append(f"{name}: left out: {len(log_n)} points, the 5-parameter law needs at least {MIN_PARAMETRIC}")
        return False
    if np.std(log_d - np.polyval(np.polyfit(log_n, log_d, 1), log_n)) < 0.05:
        notes.append(f"{name}: left out: tokens are (nearly) a fixed power of parameters, as in a miniseries at one "
                     f"tokens-per-parameter ratio, so A/N^alpha and B/D^beta cannot be told apart")
        return False
    return True


def _isoflop_budgets(table, notes):
    """The budget each point joins for IsoFLOP (NaN: none): the runs' target_flops or the CSV's C when at least
    2 budgets have >= 3 points, else continuous C binned in log space, else none (and the section is left out)."""
    def usable(labels):
        counts = labels.value_counts()
        return labels.where(labels.isin(counts.index[counts >= 3])), (counts >= 3).sum() >= 2

    labels, ok = usable(table["budget"])
    if not ok:
        bins = np.round(np.log10(table["C"]) / BIN_DEX)  # bins centred on round budgets (1e18, 2e18, 3e18, 5e18)
        labels, ok = usable(np.exp(np.log(table["C"]).groupby(bins).transform("mean")))
        if ok:
            notes.append(f"isoflop: no FLOPs budget shared by >= 3 points (target_flops, or a CSV's C); C was binned "
                         f"into {BIN_DEX}-decade bins of log10 C, each bin's budget the geometric mean of its C")
    if not ok:
        notes.append("isoflop: left out: fewer than 2 FLOPs budgets have >= 3 points (a miniseries trains one run "
                     "per depth; IsoFLOP needs several depths at each target_flops)")
        return labels * np.nan
    if labels.isna().any():
        notes.append(f"isoflop: {labels.isna().sum()} point(s) outside any budget with >= 3 points left out of it")
    return labels


def _isoflop(table, n_boot, rng, notes) -> Fit | None:
    rows = table[table["isoflop_C"].notna()]
    budgets, windows, sizes = [], [], []
    for c, points in rows.groupby("isoflop_C"):
        log_n, log_d, loss = np.log(points["N"].to_numpy()), np.log(points["D"].to_numpy()), points["loss"].to_numpy()
        keep = F.near_minimum(log_n, loss)
        window = (log_n[keep], log_d[keep], loss[keep])
        if not np.isfinite(F.isoflop_minimum(*window)[0]):
            notes.append(f"isoflop: budget C={c:.3g} left out: its points near the minimum do not make a "
                         f"parabola that opens upwards")
            continue
        if np.argmin(loss) in (np.argmin(log_n), np.argmax(log_n)):
            side = "smallest" if np.argmin(loss) == np.argmin(log_n) else "largest"
            notes.append(f"isoflop: budget C={c:.3g}: the lowest loss is at the {side} N tried, so its N_opt is "
                         f"extrapolated; add runs beyond it")
        budgets.append(c)
        windows.append(window)
        sizes.append((len(points), len(keep)))
    if len(budgets) < 2:
        if not rows.empty:  # (when empty, _isoflop_budgets said why)
            notes.append("isoflop: left out: fewer than 2 budgets have a fitted minimum")
        return None
    log_c, m = np.log(budgets), len(budgets)

    def with_ratio(v):  # append log(D* / N*) at the budgets' geometric mean
        return np.concatenate([v, ((v[..., 2] - v[..., 0]) * log_c.mean() + v[..., 3] - v[..., 1])[..., None]], -1)

    point = with_ratio(F.isoflop(log_c, windows))
    samples = with_ratio(F.isoflop_bootstrap(log_c, windows, n_boot, rng))
    _note_failures("isoflop", samples[:, 0], notes)
    linear = np.zeros(point.size, bool)  # shown as fitted: the exponents and the minimum losses; the rest in logs
    linear[[0, 2]] = linear[4 + 2 * m:4 + 3 * m] = True
    est = list(_estimates(range(point.size), _exp_except(point, linear), _exp_except(samples, linear)).values())
    section = {"a": est[0], "N_opt_coefficient": est[1], "b": est[2], "D_opt_coefficient": est[3],
               "tokens_per_param": est[-1], "tokens_per_param_at_C": math.exp(log_c.mean()),
               "budgets": [{"C": float(c), "N_opt": est[4 + j], "D_opt": est[4 + m + j], "loss_min": est[4 + 2 * m + j],
                            "n_points": sizes[j][0], "n_fitted": sizes[j][1]} for j, c in enumerate(budgets)],
               "n_points": sum(n for n, _ in sizes),
               "form": "N_opt = N_opt_coefficient * C^a, D_opt = D_opt_coefficient * C^b; each budget's minimum "
                       f"from a parabola through its lowest point and up to {F.WINDOW} neighbours each side"}
    return Fit(section, point, samples)


def _frontier(table, key, n_boot, rng, notes) -> Fit | None:
    """A power law in C through the points no cheaper run beats (lowest loss, highest CORE)."""
    rows = table[table[key] > 0]
    if key == "core" and table[key].notna().sum() > len(rows):
        notes.append(f"frontier: {table[key].notna().sum() - len(rows)} CORE value(s) <= 0 left out (log scale)")
    log_c, y = np.log(rows["C"].to_numpy()), rows[key].to_numpy()
    front = F.pareto_front(log_c, y, lower_is_better=key == "loss")
    if len(front) < 3 or np.unique(log_c[front]).size < 2:
        notes.append(f"frontier: {key} left out: {len(front)} point(s) on its frontier, 3 at 2 or more budgets "
                     f"needed" if len(rows) else f"frontier: {key} left out: no run has a value")
        return None
    x, log_y = log_c[front], np.log(y[front])
    point = F.power_law(x, log_y)
    samples = F.bootstrap(lambda i: F.power_law(x[i], log_y[i]), [np.arange(len(x))], n_boot, rng)
    _note_failures(f"frontier {key}", samples[:, 0], notes)
    linear = np.array([True, False])  # the exponent as fitted, the coefficient as exp(its log)
    return Fit({**_estimates(["exponent", "coefficient"], _exp_except(point, linear), _exp_except(samples, linear)),
                "n_points": len(front), "form": f"{key} = coefficient * C^exponent"}, point, samples)


def _holdout(table, parametric, isoflop, frontier, notes) -> dict | None:
    """Refit without the largest budget and predict it: how far the fits extrapolate one budget up."""
    grouped = table["isoflop_C"].notna().any()
    held_c = table["isoflop_C"].max() if grouped else table["C"].max()
    held = (table["isoflop_C"] == held_c) if grouped else (table["C"] == held_c)
    train, test = table[~held], table[held]
    out = {"held_out_C": float(held_c), "n_held_out": int(held.sum()), "n_train": len(train)}
    log = lambda rows, c: np.log(rows[c].to_numpy())  # noqa: E731
    if parametric and _parametric_possible(log(train, "N"), log(train, "D"), [], "holdout"):
        theta = F.fit_parametric(log(train, "N"), log(train, "D"), log(train, "loss"))
        err = np.exp(F.predict_log_loss(theta, log(test, "N"), log(test, "D"))) / test["loss"].to_numpy() - 1
        out["parametric"] = {"loss_mean_abs_rel_err": float(np.abs(err).mean()),
                             "loss_max_abs_rel_err": float(np.abs(err).max())}
    held_fit = isoflop and isoflop.section["budgets"][-1]
    if held_fit and held_fit["C"] == held_c and len(isoflop.section["budgets"]) >= 3:
        rest = _isoflop(train, 0, None, [])
        if rest:
            out["isoflop"] = {}
            for key, exponent, coef in (("N_opt", "a", "N_opt_coefficient"), ("D_opt", "b", "D_opt_coefficient")):
                predicted = rest.section[coef]["value"] * held_c ** rest.section[exponent]["value"]
                out["isoflop"].update({f"{key}_predicted": predicted, f"{key}_fitted": held_fit[key]["value"],
                                       f"{key}_rel_err": predicted / held_fit[key]["value"] - 1})
    if "loss" in frontier:
        rest = _frontier(train, "loss", 0, None, [])
        if rest:
            observed = test["loss"].min()
            predicted = math.exp(np.polyval(rest.point, math.log(test.loc[test["loss"].idxmin(), "C"])))
            out["frontier"] = {"loss_predicted": predicted, "loss_observed": float(observed),
                               "loss_rel_err": predicted / observed - 1}
    if len(out) == 3:
        notes.append("holdout: left out: without the largest budget no fit has enough points")
        return None
    return out


def _optimal(c, k, table, parametric, isoflop, frontier, notes) -> dict:
    """N, D and loss for compute C, from each fit that exists, with intervals from the same resamples."""
    out = {"C": c}
    log_c = math.log(c)
    if not table["C"].min() / 3 <= c <= 3 * table["C"].max():
        notes.append(f"optimal: C={c:.3g} is outside the data's compute range ({table['C'].min():.3g} to "
                     f"{table['C'].max():.3g}) by more than 3x: an extrapolation")
    with np.errstate(all="ignore"):  # a resample with alpha or beta <= 0 has no optimum: NaN, left out
        if parametric:
            opt = lambda t: np.exp(np.array(F.parametric_optimum(t, log_c, k)))  # noqa: E731
            out["parametric"] = _estimates(["N_opt", "D_opt", "loss"], opt(parametric.point),
                                           np.array([opt(t) for t in parametric.samples]).reshape(-1, 3))
        if isoflop:
            line = lambda v: np.exp([v[0] * log_c + v[1], v[2] * log_c + v[3]])  # noqa: E731
            out["isoflop"] = _estimates(["N_opt", "D_opt"], line(isoflop.point),
                                        np.array([line(v) for v in isoflop.samples]).reshape(-1, 2))
        if frontier:
            loss = lambda v: np.exp([np.polyval(v, log_c)])  # noqa: E731
            out["frontier"] = _estimates(["loss"], loss(frontier.point),
                                         np.array([loss(v) for v in frontier.samples]).reshape(-1, 1))
    return out


def _exp_except(values, linear):
    """exp() of the log-space entries, the others as they are (works on a point and on a samples matrix)."""
    with np.errstate(over="ignore"):
        return np.where(linear, values, np.exp(values))


def _estimates(names, point, samples) -> dict:
    low, high = F.interval(samples)
    return {n: {"value": v, "ci_low": lo, "ci_high": hi} for n, v, lo, hi in zip(names, point, low, high)}


def _note_failures(name, column, notes):
    failed = int(np.isnan(column).sum())
    if failed:
        notes.append(f"{name}: {failed} of {len(column)} bootstrap resamples could not be fitted; the intervals "
                     f"leave them out")


# ---------------------------------------------------------------------------------------------- the CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        raise UserError(message)


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value
    return parse


def _parser():
    p = _Parser(prog="python -m scaling.analyze", description=__doc__.split("\n\n")[1])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="a sweep folder, run folders, or a CSV")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--budget", type=_positive(float), metavar="FLOPS",
                   help="the compute-optimal N, D and loss for this budget, with intervals")
    p.add_argument("--bootstrap", type=_positive(int), default=1000, metavar="N",
                   help="resamples per fit (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="of the bootstrap (default 0)")
    p.add_argument("--n-column", choices=list(N_COLUMNS), default=None,
                   help="the parameter count used as N for run folders (default scaling: transformer matrices + "
                        "lm_head, what nanochat's target_param_data_ratio multiplies)")
    return p


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        table, skipped = collect(args.inputs, args.n_column or "scaling")
        results = analyze(table, args.bootstrap, args.seed, args.budget)
        from_csv = is_csv(args.inputs)
        if args.n_column and from_csv:
            results["notes"].append("--n-column applies to run folders; a CSV's N is used as given")
        results["inputs"].update({"sources": args.inputs, "n_points": len(table), "skipped": skipped,
                                  "N": "the CSV's N" if from_csv else N_COLUMNS[args.n_column or "scaling"],
                                  "loss": "the CSV's loss" if from_csv else "val_bpb", "bootstrap": args.bootstrap,
                                  "seed": args.seed, "interval": "95% percentile bootstrap",
                                  "huber_delta": F.HUBER_DELTA})
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create --out {out}: {exc.strerror}") from None
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table.to_csv(out / "table.csv", index=False)
    (out / "fits.json").write_text(json.dumps(_plain(results), indent=2) + "\n")
    plots = draw_all(table, results, out)
    write_summary(out / "summary.md", table, results, plots)
    print(f"wrote {out / 'fits.json'}, table.csv, summary.md and {len(plots)} plot(s) to {out}")
    return 0


def _plain(value):
    """JSON-ready: numpy numbers as Python's, NaN and infinities (a fit that failed) as null."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
