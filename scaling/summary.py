"""summary.md: the fits in words and tables, for a reader who does not open fits.json."""

import math


def write_summary(path, table, results: dict, plots: list[str]) -> None:
    inputs = results["inputs"]
    lines = ["# Scaling analysis", "",
             f"{inputs['n_points']} points from {', '.join(map(str, inputs['sources']))}; N = {inputs['N']}, "
             f"loss = {inputs['loss']}, D = tokens, C = FLOPs ({inputs['flops_per_param_token']:.2f} per parameter "
             f"per token, median). Intervals: {inputs['interval']}, {inputs['bootstrap']} resamples, seed "
             f"{inputs['seed']}."]
    if table["gpu_hours"].notna().any():
        lines.append(f"Compute spent: {table['gpu_hours'].sum():,.1f} GPU-hours, "
                     f"{table['wall_time_s'].sum() / 3600:,.1f} hours of wall time over {len(table)} runs.")
    if "parametric" in results:
        p = results["parametric"]
        lines += ["", "## Parametric law (Chinchilla approach 3)", "", f"{p['form']}. Huber (delta "
                  f"{inputs['huber_delta']}) on log residuals, L-BFGS from a grid of starts; {p['n_points']} points.",
                  "", *_table(["", "value", "95% CI"], [[k, *_estimate(p[k])] for k in
                                                         ("E", "A", "B", "alpha", "beta", "a", "b")])]
    if "isoflop" in results:
        iso = results["isoflop"]
        lines += ["", "## IsoFLOP (Chinchilla approach 2)", "",
                  f"N* ∝ C^a with a = {_with_ci(iso['a'])}; D* ∝ C^b with b = {_with_ci(iso['b'])}; "
                  f"{_with_ci(iso['tokens_per_param'])} tokens per parameter at C = "
                  f"{iso['tokens_per_param_at_C']:.3g}.", "",
                  *_table(["C", "points (fitted)", "N_opt", "D_opt", "loss_min"],
                          [[f"{b['C']:.3g}", f"{b['n_points']} ({b['n_fitted']})",
                            *(_with_ci(b[k]) for k in ("N_opt", "D_opt", "loss_min"))] for b in iso["budgets"]])]
    if "frontier" in results:
        lines += ["", "## Compute frontier (power laws, as nanochat's miniseries)", ""]
        lines += [f"- {f['form']}: exponent {_with_ci(f['exponent'])}, coefficient {_with_ci(f['coefficient'])} "
                  f"({f['n_points']} frontier points)"
                  for f in results["frontier"].values()]
    if "holdout" in results:
        h = results["holdout"]
        lines += ["", f"## Holdout: the largest budget (C = {h['held_out_C']:.3g}, {h['n_held_out']} points) "
                      f"predicted from the rest", ""]
        lines += [f"- {name}: " + ", ".join(f"{k} {_number(v)}" for k, v in check.items())
                  for name, check in h.items() if isinstance(check, dict)]
    if "optimal" in results:
        o = results["optimal"]
        lines += ["", f"## Compute-optimal allocation at C = {o['C']:.3g}", ""]
        lines += [f"- {name}: " + "; ".join(f"{k} {_with_ci(v)}" for k, v in fit.items())
                  for name, fit in o.items() if isinstance(fit, dict)]
    if results["notes"]:
        lines += ["", "## Notes", "", *(f"- {note}" for note in results["notes"])]
    if inputs["skipped"]:
        lines += ["", "## Skipped runs", "", *(f"- {run}" for run in inputs["skipped"])]
    if plots:
        lines += ["", "## Plots", "", *(f"![{name}]({name})" for name in plots)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _estimate(e: dict) -> list[str]:
    return [_number(e["value"]), f"[{_number(e['ci_low'])}, {_number(e['ci_high'])}]"]


def _with_ci(e: dict) -> str:
    return " ".join(_estimate(e))


def _number(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.4g}"


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]
