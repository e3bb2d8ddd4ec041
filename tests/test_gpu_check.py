"""python -m experiments.bench gpu --dry: the GPU check CPU-sized passes here, with one row per check; a broken
kernel is a FAIL that fails the run (exit 1) while the other rows still run."""

import contextlib
import io

import pytest
import torch

from experiments import bench
from experiments.gpu_check import DRY_PLAN, GpuCheck
from nanochat import attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CUDA_ONLY = {"attention fa3", "attention fa2", "attention flex", "fp8 on/off d1", "peak memory"}


@pytest.fixture(scope="module")
def dry_run(one_torch_thread):
    """The dry run's exit code and output (once for the module: it takes ~15 s of one core)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = bench.main(["gpu", "--dry"])
    return code, out.getvalue()


def rows(out: str) -> dict[str, list[str]]:
    lines = [line for line in out.splitlines() if line.startswith("| ")][2:]  # past the header and --- lines
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {name: rest for name, *rest in cells}


def test_the_dry_run_passes_with_a_row_per_check(dry_run):
    code, out = dry_run
    assert code == 0, out
    table = rows(out)
    assert list(table) == ["bf16 vs fp32", "attention fa3", "attention fa2", "attention flex", "attention sdpa",
                           "compile on/off d1", "MFU d1", "fp8 on/off d1", "async checkpoint stall d1", "MFU d2",
                           "decode d2 batch 1", "decode d2 batch 4", "peak memory"]
    for name, (status, figure, seconds) in table.items():
        if name in CUDA_ONLY and not torch.cuda.is_available():
            assert status == "skipped: no CUDA" and figure == "", name
        else:
            assert status == "ok" and figure, name
        assert float(seconds) >= 0
    assert "MFU unknown" in table["MFU d1"][1]  # no peak FLOP/s for a CPU: no figure is made up
    assert "tol" in table["bf16 vs fp32"][1] and "rel. error" in table["attention sdpa"][1]
    assert out.rstrip().splitlines()[-1].startswith("all checks that ran are ok")


def test_a_broken_kernel_is_a_fail_and_the_rest_still_runs(monkeypatch):
    """SDPA with a doubled softmax scale disagrees with the reference; a check that raises is a FAIL with its
    reason; both leave the next rows to run, and the run's exit code is 1."""
    real = torch.nn.functional.scaled_dot_product_attention

    def doubled_scale(q, k, v, **kwargs):
        return real(q, k, v, scale=2 / q.size(-1) ** 0.5, **kwargs)

    check = GpuCheck(DRY_PLAN)
    with monkeypatch.context() as patch:
        patch.setattr(attention.F, "scaled_dot_product_attention", doubled_scale)
        check.run("attention sdpa", lambda: check.attention("sdpa"))
    check.run("raises", lambda: 1 / 0)
    check.run("fine", lambda: (True, "42"))
    assert [(row.check, row.status) for row in check.rows] == [
        ("attention sdpa", "FAIL"), ("raises", "FAIL"), ("fine", "ok")]
    assert check.rows[1].figure == "ZeroDivisionError: division by zero"

    monkeypatch.setattr(GpuCheck, "all", lambda self: False)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["gpu", "--dry"])
    assert exit_.value.code == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_and_without_dry_it_says_so_in_one_line(capsys):
    assert bench.main(["gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no CUDA device") and err.count("\n") == 1

