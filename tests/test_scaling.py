"""scaling/: the fits recover known constants, intervals cover the truth, and the CLI turns run folders or a CSV
into fits.json, table.csv, plots and summary.md (or one line and exit 2 on bad input)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from scaling import fits as F
from scaling.analyze import main
from scaling.benchmark_fits import CHINCHILLA, synthetic_sweep

E, A, B, ALPHA, BETA = (CHINCHILLA[k] for k in ("E", "A", "B", "alpha", "beta"))
A_OPT = BETA / (ALPHA + BETA)  # N* ∝ C^a
BUDGETS = (1e18, 1e19, 1e20, 1e21, 1e22)


def logs(table):
    return [np.log(table[c].to_numpy()) for c in ("N", "D", "loss")]


def true_n_opt(c):
    return (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA)) * (c / 6) ** A_OPT


def test_import_does_not_load_torch():
    code = "import sys, scaling.analyze, scaling.benchmark_fits; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_objective_gradient_is_exact_and_summed():
    log_n, log_d, log_l = logs(synthetic_sweep())
    theta = np.array([6.0, 6.0, 0.5, 0.3, 0.3])
    value, grad = F._objective(theta, log_n, log_d, log_l)
    numeric = [(F._objective(theta + h, log_n, log_d, log_l)[0] - F._objective(theta - h, log_n, log_d, log_l)[0])
               / 2e-7 for h in np.eye(5) * 1e-7]
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-9)
    # a sum over points: twice the data, twice the objective (a mean would stay the same)
    doubled = F._objective(theta, *(np.tile(x, 2) for x in (log_n, log_d, log_l)))[0]
    assert doubled == pytest.approx(2 * value)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parametric_recovers_chinchilla_constants(seed):
    table = synthetic_sweep(BUDGETS, per_budget=7, noise=0.005, seed=seed)
    fit = F.constants(F.fit_parametric(*logs(table)))
    assert fit["E"] == pytest.approx(E, rel=0.03)
    assert fit["A"] == pytest.approx(A, rel=0.3)
    assert fit["B"] == pytest.approx(B, rel=0.3)
    assert fit["alpha"] == pytest.approx(ALPHA, abs=0.02)
    assert fit["beta"] == pytest.approx(BETA, abs=0.02)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_converges_below_the_truth(seed):
    """A converged fit scores at least as well as the true constants on the same data; one that stops early
    (scipy's default tolerances on this ~1e-4 objective) does not."""
    data = logs(synthetic_sweep(BUDGETS[:3], per_budget=6, seed=seed))
    truth = np.array([np.log(A), np.log(B), np.log(E), ALPHA, BETA])
    assert F._objective(F.fit_parametric(*data), *data)[0] <= F._objective(truth, *data)[0]


def test_parabola_recovers_known_optimum():
    x = np.linspace(16, 22, 7)
    vertex = F.parabola_vertex(x, 3.0 + 0.05 * (x - 19.3) ** 2)
    assert vertex == pytest.approx((19.3, 3.0), abs=1e-9)
    assert F.parabola_vertex(x, 3.0 - 0.05 * (x - 19.3) ** 2) is None  # opens downwards: no minimum
    assert F.parabola_vertex(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) is None


def test_isoflop_recovers_optimum_and_exponents():
    """Noise-free Chinchilla loss at 5 budgets: the minima within 5% of the law's N*, the exponent within 0.01."""
    table = synthetic_sweep(BUDGETS, per_budget=9, noise=0.0)
    log_n, log_d, log_l = logs(table)
    windows = []
    for c in BUDGETS:
        at = table["C"].to_numpy() == c
        keep = F.near_minimum(log_n[at], np.exp(log_l[at]))
        windows.append((log_n[at][keep], log_d[at][keep], np.exp(log_l[at][keep])))
    v = F.isoflop(np.log(BUDGETS), windows)
    np.testing.assert_allclose(np.exp(v[4:9]), true_n_opt(np.array(BUDGETS)), rtol=0.05)
    assert v[0] == pytest.approx(A_OPT, abs=0.01)
    assert v[0] + v[2] == pytest.approx(1.0, abs=1e-6)  # C = 6ND exactly: a + b = 1


def test_intervals_cover_the_truth_for_most_seeds():
    """Over 20 noisy sweeps, the 95% intervals (a small bootstrap) hold the true constants in >= 80% of them,
    and stay narrow enough to mean something."""
    truth = np.array([np.log(A), np.log(B), np.log(E), ALPHA, BETA])
    covered, widths = np.zeros(5), []
    for seed in range(20):
        table = synthetic_sweep(BUDGETS, per_budget=7, noise=0.005, seed=seed)
        log_n, log_d, log_l = logs(table)
        theta = F.fit_parametric(log_n, log_d, log_l)
        samples = F.bootstrap(lambda i: F.fit_parametric(log_n[i], log_d[i], log_l[i], start=theta),
                              [np.arange(len(table))], 40, np.random.default_rng(seed))
        low, high = F.interval(samples)
        covered += (low <= truth) & (truth <= high)
        widths.append(high - low)
    assert (covered >= 16).all(), f"coverage per constant (a, b, e, alpha, beta) out of 20: {covered}"
    assert np.median(np.array(widths)[:, 3:], axis=0).max() < 0.1  # alpha and beta


def test_isoflop_intervals_cover_the_exponent():
    covered = 0
    for seed in range(20):
        table = synthetic_sweep(BUDGETS, per_budget=7, noise=0.005, seed=seed)
        log_n, log_d, log_l = logs(table)
        windows = []
        for c in BUDGETS:
            at = table["C"].to_numpy() == c
            keep = F.near_minimum(log_n[at], np.exp(log_l[at]))
            windows.append((log_n[at][keep], log_d[at][keep], np.exp(log_l[at][keep])))
        low, high = F.interval(F.isoflop_bootstrap(np.log(BUDGETS), windows, 200, np.random.default_rng(seed)))
        covered += low[0] <= A_OPT <= high[0]
    assert covered >= 16


# ---------------------------------------------------------------------------------------------- the CLI

def make_run(folder, n, d, loss, target_flops, core=None, finished=True):
    """A run folder as the pipeline leaves it: config.yaml, base_train/{metrics.jsonl,summary.json}, base_eval."""
    (folder / "base_train").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"depth": 4, "num_iterations": -1,
                                                        "target_flops": target_flops}))
    (folder / "base_train" / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "loss": loss * 1.1, "tokens": d / 2, "flops": 3 * n * d}) + "\n" +
        json.dumps({"step": 20, "val_bpb": loss}) + "\n")
    if not finished:
        return
    summary = {"step": 20, "loss": loss * 1.05, "val_bpb": loss, "tokens": d, "flops": 6 * n * d,
               "wall_time_s": 3600.0, "tok_per_sec": d / 3600, "mfu": 40.0, "params_total": 1.5 * n,
               "params_non_embedding": 1.2 * n, "params_scaling": n, "depth": 4, "world_size": 8,
               "gpu_type": "H100", "gpu_hours": 8.0, "requeues": 0, "weights_sha256": "0" * 64}
    (folder / "base_train" / "summary.json").write_text(json.dumps(summary))
    if core is not None:
        (folder / "base_eval").mkdir()
        (folder / "base_eval" / "summary.json").write_text(json.dumps({"val_bpb": loss, "core_metric": core}))


@pytest.fixture
def sweep(tmp_path):
    """4 budgets x 5 sizes of finished runs (CORE for some, "n/a (not staged)" for one), one unfinished run, and
    the rest of a sweep folder (manifest.json, the tokenizer run)."""
    root = tmp_path / "sweep"
    table = synthetic_sweep(BUDGETS[:4], per_budget=5, noise=0.003, seed=3)
    for i, row in table.iterrows():
        make_run(root / f"run{i:02d}", row.N, row.D, row.loss, row.C,
                 core="n/a (not staged)" if i == 0 else (0.3 - 0.1 * row.loss if i % 2 else None))
    make_run(root / "late", 1e8, 1e9, 3.0, 1e18, finished=False)
    (root / "manifest.json").write_text("{}")
    (root / "tokenizer" / "tok_train").mkdir(parents=True)  # the sweep's shared tokenizer run: not a training run
    (root / "tokenizer" / "config.yaml").write_text(yaml.safe_dump({"stages": ["tok_train", "tok_eval"]}))
    return root


def estimate_keys(section, names):
    for name in names:
        assert set(section[name]) == {"value", "ci_low", "ci_high"}, name
        assert section[name]["ci_low"] <= section[name]["value"] <= section[name]["ci_high"], name


def test_cli_on_a_sweep_folder(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out), "--bootstrap", "30", "--budget", "1e21"]) == 0
    results = json.loads((out / "fits.json").read_text())
    estimate_keys(results["parametric"], ["E", "A", "B", "alpha", "beta"])
    assert results["parametric"]["n_points"] == 20
    iso = results["isoflop"]
    estimate_keys(iso, ["a", "b", "tokens_per_param"])
    assert [b["C"] for b in iso["budgets"]] == list(BUDGETS[:4])
    for budget in iso["budgets"]:
        assert budget["n_points"] == 5
        estimate_keys(budget, ["N_opt", "D_opt", "loss_min"])
    assert iso["a"]["value"] == pytest.approx(A_OPT, abs=0.08)
    estimate_keys(results["frontier"]["loss"], ["exponent", "coefficient"])
    assert results["frontier"]["loss"]["exponent"]["value"] < 0
    assert results["holdout"]["held_out_C"] == BUDGETS[3]
    assert results["optimal"]["C"] == 1e21
    estimate_keys(results["optimal"]["parametric"], ["N_opt", "D_opt", "loss"])
    assert results["optimal"]["parametric"]["N_opt"]["value"] == pytest.approx(true_n_opt(1e21), rel=0.3)
    assert results["inputs"]["skipped"] == ["late: base_train unfinished (no summary.json)"]
    assert isinstance(results["notes"], list)

    table = (out / "table.csv").read_text().splitlines()
    assert len(table) == 21 and table[0].startswith("run,depth,params_total")
    for name in ("isoflop.png", "frontier.png", "optimal.png", "residuals.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = (out / "summary.md").read_text()
    assert "## IsoFLOP" in summary and "late: base_train unfinished" in summary


def test_cli_reads_core_and_picks_the_parameter_count(sweep, tmp_path):
    from scaling.collect import collect

    table, _ = collect([str(sweep)], "total")
    assert (table["N"] == table["params_total"]).all()
    assert np.isnan(table.loc[table["run"] == "run00", "core"]).all()  # "n/a (not staged)"
    assert table["core"].notna().sum() == 10  # base_eval's core_metric where one ran
    two, skipped = collect([str(sweep / "run01"), str(sweep / "late")])
    assert list(two["run"]) == ["run01"] and len(skipped) == 1


def test_cli_on_a_csv_without_c_bins_compute(tmp_path):
    csv = tmp_path / "points.csv"
    synthetic_sweep(BUDGETS[:3], per_budget=6, seed=1)[["N", "D", "loss"]].to_csv(csv, index=False)
    assert main([str(csv), "--out", str(tmp_path / "out"), "--bootstrap", "20"]) == 0
    results = json.loads((tmp_path / "out" / "fits.json").read_text())
    assert [b["C"] for b in results["isoflop"]["budgets"]] == pytest.approx(BUDGETS[:3])
    assert any("binned" in note for note in results["notes"])


def test_a_miniseries_gets_power_laws_and_notes(tmp_path):
    """One run per size at a fixed tokens-per-parameter ratio: no IsoFLOP, no parametric law, just the frontier."""
    n = np.geomspace(2e7, 2e9, 6)
    csv = tmp_path / "mini.csv"
    loss = E + A / n ** ALPHA + B / (20 * n) ** BETA
    core = 1e-3 * (6 * n * 20 * n) ** 0.1  # CORE = 1e-3 C^0.1
    csv.write_text("N,D,loss,core\n" + "".join(f"{a},{20 * a},{l},{c}\n" for a, l, c in zip(n, loss, core)))
    assert main([str(csv), "--out", str(tmp_path / "out"), "--bootstrap", "20"]) == 0
    results = json.loads((tmp_path / "out" / "fits.json").read_text())
    assert "isoflop" not in results and "parametric" not in results
    assert results["frontier"]["core"]["exponent"]["value"] == pytest.approx(0.1, abs=1e-6)
    notes = " ".join(results["notes"])
    assert "isoflop: left out" in notes and "parametric: left out" in notes
    assert (tmp_path / "out" / "frontier.png").is_file() and not (tmp_path / "out" / "isoflop.png").exists()


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"), ("empty", "holds no run folders"), ("unfinished", "no finished runs"),
    ("columns", "missing column(s) D"), ("negative", "row 3 column D is -1000000000.0"), ("option", "must be > 0")])
def test_bad_input_is_one_line_and_exit_2(case, expected, tmp_path, capsys):
    csv = tmp_path / "points.csv"
    csv.write_text({"columns": "N,loss\n1e8,3.0\n", "negative": "N,D,loss\n1e8,1e9,3.0\n1e8,-1e9,3.0\n"}
                   .get(case, "N,D,loss\n1e8,1e9,3.0\n"))
    make_run(tmp_path / "sweep" / "r1", 1e8, 1e9, 3.0, 1e18, finished=False)
    (tmp_path / "empty").mkdir()
    target = {"missing": tmp_path / "nowhere", "empty": tmp_path / "empty", "unfinished": tmp_path / "sweep"}
    args = [str(target.get(case, csv)), "--out", str(tmp_path / "out")] + (["--bootstrap", "0"] if case == "option"
                                                                         else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "out").exists()


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scaling.analyze", str(tmp_path / "nowhere"), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'} does not exist"]


def test_frontier_compares_runs_of_one_budget_whose_compute_differs_by_rounding():
    """Two runs of the 1e17 budget, C apart by their horizons' rounding: the worse one is not on the frontier
    because its C came out a hair lower (it was, with 5.14 beside 4.38)."""
    c = np.array([1e17 * (1 - 1e-6), 1e17, 1e18 * 1.002, 1e18, 1e19])
    loss = np.array([5.14, 4.38, 4.05, 3.90, 3.60])
    front = sorted(F.pareto_front(np.log(c), loss).tolist())
    assert front == [1, 3, 4]
    core = np.array([0.10, 0.12, 0.20, 0.18, 0.25])  # higher is better: the best of each budget
    assert sorted(F.pareto_front(np.log(c), core, lower_is_better=False).tolist()) == [1, 2, 4]
