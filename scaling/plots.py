"""PNG plots from the table and fits.json alone (so they can be redrawn from the outputs): IsoFLOP curves with
their minima, the loss-compute frontier, N* and D* against C with intervals, and the parametric fit's residuals.
A plot whose section was left out is not drawn."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a login or compute node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

from scaling import fits as F  # noqa: E402


def draw_all(table, results: dict, out: Path) -> list[str]:
    """Write every plot the results support; returns the file names."""
    drawn = []
    for name, draw, section in (("isoflop.png", _isoflop, "isoflop"), ("frontier.png", _frontier, "frontier"),
                                ("optimal.png", _optimal, "isoflop"), ("residuals.png", _residuals, "parametric")):
        if section in results:
            fig = draw(table, results)
            fig.savefig(out / name, dpi=120, bbox_inches="tight")
            plt.close(fig)
            drawn.append(name)
    return drawn


def _isoflop(table, results):
    fig, ax = plt.subplots(figsize=(7, 5))
    budgets = sorted(table["isoflop_C"].dropna().unique())
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    minima = {b["C"]: b for b in results["isoflop"]["budgets"]}
    for budget, color in zip(budgets, colors):
        rows = table[table["isoflop_C"] == budget]
        log_n, loss = np.log(rows["N"].to_numpy()), rows["loss"].to_numpy()
        ax.scatter(np.exp(log_n), loss, color=color, s=18, label=f"C = {budget:.2g}")
        keep = F.near_minimum(log_n, loss)
        if np.unique(log_n[keep]).size >= 3:
            x = np.linspace(log_n[keep].min(), log_n[keep].max(), 50)
            ax.plot(np.exp(x), np.polyval(np.polyfit(log_n[keep], loss[keep], 2), x), color=color, lw=1)
        if budget in minima:
            ax.plot(minima[budget]["N_opt"]["value"], minima[budget]["loss_min"]["value"], "x", color=color, ms=9)
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="IsoFLOP curves (x: fitted minimum)")
    ax.legend(fontsize=7)
    return fig


def _frontier(table, results):
    panels = [k for k in ("loss", "core") if k in results["frontier"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        fit = results["frontier"][key]
        rows = table[table[key] > 0]
        ax.scatter(rows["C"], rows[key], s=14, color="0.6", label="runs")
        front = rows.iloc[F.pareto_front(np.log(rows["C"].to_numpy()), rows[key].to_numpy(), key == "loss")]
        ax.scatter(front["C"], front[key], s=22, color="C0", label="frontier")
        c = np.geomspace(rows["C"].min(), rows["C"].max(), 50)
        ax.plot(c, fit["coefficient"]["value"] * c ** fit["exponent"]["value"], color="C1",
                label=f"{key} = {fit['coefficient']['value']:.3g} C^{fit['exponent']['value']:.3f}")
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=key, title=f"{key}-compute frontier")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 2.6, not 2.6x10^0
            axis(FormatStrFormatter("%.3g"))
        ax.legend(fontsize=8)
    return fig


def _optimal(table, results):
    iso = results["isoflop"]
    c = np.array([b["C"] for b in iso["budgets"]])
    line = np.geomspace(c.min(), c.max(), 50)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")  # room for log tick labels
    for ax, key, exponent, coefficient in ((axes[0], "N_opt", "a", "N_opt_coefficient"),
                                           (axes[1], "D_opt", "b", "D_opt_coefficient")):
        value = np.array([b[key]["value"] for b in iso["budgets"]], dtype=float)
        low = np.array([_or_nan(b[key]["ci_low"]) for b in iso["budgets"]])
        high = np.array([_or_nan(b[key]["ci_high"]) for b in iso["budgets"]])
        yerr = np.clip(np.nan_to_num(np.vstack([value - low, high - value])), 0, None)
        ax.errorbar(c, value, yerr=yerr, fmt="o", capsize=3, label="per budget (95% CI)")
        ax.plot(line, iso[coefficient]["value"] * line ** iso[exponent]["value"],
                label=f"{key} ∝ C^{iso[exponent]['value']:.3f}")
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=key)
        ax.legend(fontsize=8)
    return fig


def _residuals(table, results):
    p = results["parametric"]
    theta = [np.log(p["A"]["value"]), np.log(p["B"]["value"]), np.log(p["E"]["value"]), p["alpha"]["value"],
             p["beta"]["value"]]
    log_n, log_d = np.log(table["N"].to_numpy()), np.log(table["D"].to_numpy())
    residual = np.log(table["loss"].to_numpy()) - F.predict_log_loss(theta, log_n, log_d)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = ax.scatter(table["N"], residual, c=np.log10(table["C"]), s=18, cmap="viridis")
    fig.colorbar(points, ax=ax, label="log10 C")
    ax.axhline(0, color="0.5", lw=1)
    ax.set(xscale="log", xlabel="parameters N", ylabel="log L - log L_fit",
           title="Residuals of the parametric fit L(N, D)")
    return fig


def _or_nan(value):
    return np.nan if value is None else value
