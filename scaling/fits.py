"""The fits: the parametric law L(N, D) (Chinchilla approach 3), IsoFLOP parabolas (approach 2), power laws
against compute (nanochat's miniseries), and the bootstrap that puts an interval on each.

Everything works in natural logs of N, D, C and the loss. numpy and scipy only.
"""

import itertools
import warnings

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022: on log-loss residuals this is close to an L1 fit, robust to outliers
# Hoffmann's grid of starts, in the log-sum-exp parametrisation theta = (a, b, e, alpha, beta)
START_GRID = np.array(list(itertools.product(np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5),
                                             np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))))
# L-BFGS runs from the grid's 16 best-scoring points (the grid is scored in one vectorised call): on Chinchilla-like
# sweeps ~45% of all starts reached the best fit and these 16 always did; running all 4,500 takes minutes
N_STARTS = 16


# ------------------------------------------------------------------------------------------ parametric L(N, D)

def predict_log_loss(theta, log_n, log_d):
    """log L = LSE(a - alpha log N, b - beta log D, e); theta's entries may be columns (the grid in one call)."""
    a, b, e, alpha, beta = theta
    return np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)


def _huber(r):
    clipped = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
    return clipped * (r - 0.5 * clipped)  # r^2 / 2 inside delta, delta (|r| - delta / 2) outside


def _objective(theta, log_n, log_d, log_l):
    """Summed Huber loss of the log residuals and its gradient. A sum, not a mean: the mean's gradients are n
    times smaller and L-BFGS stops before it converges (the error Besiroglu et al. 2024 found in Chinchilla's
    fit). Written out rather than through predict_log_loss: the bootstrap spends its time here."""
    a, b, e, alpha, beta = theta
    t_n, t_d = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(t_n, t_d), e)
    w_n, w_d, w_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = w_n + w_d + w_e
    r = top + np.log(total) - log_l
    clipped = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # d huber / d r
    g = clipped / total  # times each term's weight: d r / d (its log)
    g_n, g_d = g * w_n, g * w_d
    grad = np.array([g_n.sum(), g_d.sum(), g @ w_e, -(g_n @ log_n), -(g_d @ log_d)])
    return clipped @ (r - 0.5 * clipped), grad


def _lbfgs(start, log_n, log_d, log_l):
    # The objective is ~1e-4 at the optimum, and scipy's ftol is relative to max(|f|, 1): its default would stop
    # at the first step that gains < 2e-9, tens of iterations early (alpha 0.28 for 0.36 on Chinchilla-like data)
    result = minimize(_objective, start, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                      options={"ftol": 1e-15, "gtol": 1e-15, "maxiter": 1000})
    return result.x, result.fun


def fit_parametric(log_n, log_d, log_l, start=None) -> np.ndarray:
    """theta = (a, b, e, alpha, beta) minimising the Huber objective: from `start` alone when given (a bootstrap
    resample warm-started at the point estimate), else the best of L-BFGS runs from the grid's best points."""
    if start is not None:
        return _lbfgs(start, log_n, log_d, log_l)[0]
    scores = _huber(predict_log_loss(START_GRID.T[..., None], log_n, log_d) - log_l).sum(-1)
    runs = [_lbfgs(s, log_n, log_d, log_l) for s in START_GRID[np.argsort(scores)[:N_STARTS]]]
    return min(runs, key=lambda run: run[1])[0]


def constants(theta) -> dict:
    """E, A, B, alpha, beta of L = E + A / N^alpha + B / D^beta."""
    a, b, e, alpha, beta = theta
    return {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta}


def parametric_optimum(theta, log_c, flops_per_nd=6.0):
    """(log N*, log D*, log L*) at compute C = k N D: N* = G (C/k)^(beta/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)) (Hoffmann et al. 2022, eq. 4)."""
    a, b, e, alpha, beta = theta
    log_nd = log_c - np.log(flops_per_nd)
    log_n = (np.log(alpha / beta) + a - b + beta * log_nd) / (alpha + beta)
    log_d = log_nd - log_n
    return log_n, log_d, predict_log_loss(theta, log_n, log_d)


# ------------------------------------------------------------------------------------- IsoFLOP (approach 2)

WINDOW = 2  # a budget's parabola uses its lowest point and up to 2 neighbours each side in log N


def parabola_vertex(x, y):
    """(x, y) at the minimum of the least-squares parabola through the points, or None when it opens downwards
    or fewer than 3 distinct x leave it undetermined."""
    if np.unique(x).size < 3:
        return None
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        return None
    x0 = -c1 / (2 * c2)
    return x0, c0 - c1 * c1 / (4 * c2)


def near_minimum(log_n, loss):
    """Indices of the points the parabola is fitted to: the lowest loss and its neighbours in log N."""
    order = np.argsort(log_n, kind="stable")
    lowest = int(np.argmin(loss[order]))
    return order[max(0, lowest - WINDOW):lowest + WINDOW + 1]


def isoflop_minimum(log_n, log_d, loss):
    """(log N*, log D*, loss*) from one budget's points near its minimum: the vertices of a parabola in log N and
    one in log D. D* is fitted rather than taken as C / 6N* because a run's FLOPs per token is not exactly 6N."""
    in_n, in_d = parabola_vertex(log_n, loss), parabola_vertex(log_d, loss)
    if in_n is None or in_d is None:
        return np.nan, np.nan, np.nan
    return in_n[0], in_d[0], in_n[1]


def isoflop(log_c, windows) -> np.ndarray:
    """Flat vector [a, a0, b, b0, log N* per budget..., log D* per budget..., loss* per budget...] where
    log N* = a log C + a0 and log D* = b log C + b0. `windows` holds each budget's (log N, log D, loss) near its
    minimum, `log_c` the budgets' log C. NaN where a parabola opens downwards, and then for the lines too: they
    always span the same budgets."""
    minima = np.array([isoflop_minimum(*w) for w in windows]).T
    ok = np.isfinite(minima).all()
    lines = [np.polyfit(log_c, m, 1) if ok else (np.nan, np.nan) for m in minima[:2]]
    return np.concatenate([lines[0], lines[1], *minima])


def isoflop_bootstrap(log_c, windows, n_resamples, rng) -> np.ndarray:
    """(n_resamples, 4 + 3 budgets) isoflop() over residual resamples. The sweep chose each budget's N, so the
    points stay and only the losses are redrawn: each budget's parabola plus residuals drawn from all budgets'
    pooled residuals, scaled by sqrt(n / (n - 3 budgets)) for the parameters the parabolas fitted. (Drawing
    points instead left fewer than 3 distinct N near a minimum in half the resamples of a 5 x 6 sweep.)"""
    fitted = [np.polyval(np.polyfit(log_n, loss, 2), log_n) for log_n, _, loss in windows]
    residuals = np.concatenate([w[2] - f for w, f in zip(windows, fitted)])
    width = 4 + 3 * len(windows)
    dof = residuals.size - 3 * len(windows)
    if dof <= 0:  # every parabola went through its 3 points exactly: nothing measures the noise
        return np.full((n_resamples, width), np.nan)
    residuals *= np.sqrt(residuals.size / dof)
    rows = [isoflop(log_c, [(log_n, log_d, f + rng.choice(residuals, f.size)) for (log_n, log_d, _), f
                            in zip(windows, fitted)]) for _ in range(n_resamples)]
    return np.array(rows, dtype=float).reshape(n_resamples, width)


# -------------------------------------------------------------------------------------------- power laws

def power_law(log_x, log_y) -> np.ndarray:
    """(exponent, log coefficient) of y = coefficient * x^exponent, least squares in log-log."""
    if np.unique(log_x).size < 2:
        return np.array([np.nan, np.nan])
    return np.polyfit(log_x, log_y, 1)


BUDGET_REL_TOL = 0.01  # compute within 1% of the next cheaper point's is the same budget (a planned horizon rounds)


def pareto_front(log_c, y, lower_is_better=True) -> np.ndarray:
    """Indices of points that no point of lower or equal compute beats: the loss-compute frontier. Compute is
    compared by budget: runs of one budget differ in C by their horizon's rounding, and the cheaper of two such
    runs must not join the frontier when the other one of the same budget beats it."""
    sign = 1 if lower_is_better else -1
    order = np.argsort(log_c, kind="stable")
    budget = np.cumsum(np.diff(log_c[order], prepend=-np.inf) > np.log1p(BUDGET_REL_TOL))
    best, keep = np.inf, []
    for b in np.unique(budget):
        members = order[budget == b]
        i = members[np.argmin(sign * y[members])]
        if sign * y[i] < best:
            best = sign * y[i]
            keep.append(i)
    return np.array(keep, dtype=int)


# --------------------------------------------------------------------------------------------- bootstrap

def bootstrap(statistic, groups, n_resamples, rng) -> np.ndarray:
    """(n_resamples, k) statistics over case resamples: each resample draws, with replacement, as many points
    from each group (an array of point indices) as it holds, so every IsoFLOP budget keeps its size."""
    rows = [statistic(np.concatenate([rng.choice(g, size=g.size) for g in groups])) for _ in range(n_resamples)]
    return np.array(rows, dtype=float) if rows else np.empty((0, np.size(statistic(np.concatenate(groups)))))


def interval(samples, level=0.95):
    """The percentile interval (low, high) per column, over the resamples whose fit succeeded."""
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():  # a column NaN in every resample (or no resamples) gives NaN, on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(samples, tail, axis=0), np.nanpercentile(samples, 100 - tail, axis=0)
