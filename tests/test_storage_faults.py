"""Storage faults injected for real into tiny base_train runs: a full disk (a small tmpfs), a full quota (EDQUOT)
and an I/O error on the sync and the async save path and on one of two ranks, damaged checkpoint files, planted
pickles. After each, the run ends with the uninterrupted run's weights_sha256 and metrics, and every message is
one line without a traceback."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_launch import launch

pytestmark = pytest.mark.slow
TINY = ["stages=[base_train]", "depth=2", "max_seq_len=128", "device_batch_size=4", "total_batch_size=1024",
        "num_iterations=8", "save_every=2", "eval_every=4", "eval_tokens=2048", "sample_every=-1"]
TIMING = {"dt", "tok_per_sec", "mfu", "time", "wall"}
REFERENCES = {}  # (extra args) -> (summary, rows) of the uninterrupted run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("storage")
    result = launch("stages=[tok_train]", "run_name=shared", "tok_train.vocab_size=1024", env_base=base)
    assert result.returncode == 0, result.stderr
    return base


def args(base, name, *extra, runs_root=None):
    tokenizer = base / "runs" / "shared" / "tok_train" / "tokenizer"
    return [*TINY, f"run_name={name}", f"tokenizer={tokenizer}", *extra] + ([f"runs_root={runs_root}"] if runs_root
                                                                              else [])


def outcome(folder: Path):
    summary = json.loads((folder / "summary.json").read_text())
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return summary["weights_sha256"], rows


def reference(base, *extra):
    """The uninterrupted run of this configuration, computed once per session."""
    if extra not in REFERENCES:
        name = f"reference-{len(REFERENCES)}"
        result = launch(*args(base, name, *extra), env_base=base)
        assert result.returncode == 0, result.stderr
        REFERENCES[extra] = outcome(base / "runs" / name / "base_train")
    return REFERENCES[extra]


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in result.stderr and len(errors) >= 1, result.stderr[-3000:]
    assert all(error == errors[0] for error in errors)  # every rank says the same line, or only one does
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "checkpoints").iterdir()) if (folder / "checkpoints").is_dir() else []


@pytest.mark.parametrize("extra", [(), ("async_save=true",)], ids=["sync", "async"])
def test_a_full_quota_loses_nothing_and_the_rerun_ends_as_if_never_stopped(base, extra):
    expected = reference(base, *extra)
    name = f"quota-{len(extra)}"
    failed = launch(*args(base, name, *extra), env_base=base, NANOCHAT_TEST_SAVE_ERRNO="EDQUOT:4")
    one_line_error(failed, "checkpoint step 4", "disk quota exceeded", "free", "needs about")
    stage = base / "runs" / name / "base_train"
    assert checkpoints(stage) == ["latest", "step_000002"]  # no torn step 4, and step 2 was not pruned
    rerun = launch(*args(base, name, *extra), env_base=base)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from step_000002" in rerun.stdout
    assert outcome(stage) == expected


def test_an_io_error_on_one_of_two_ranks_stops_both_and_loses_nothing(base):
    expected = reference(base, "nproc=2")
    failed = launch(*args(base, "eio", "nproc=2"), env_base=base, NANOCHAT_TEST_SAVE_ERRNO="EIO:4@1")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    lines = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert any("rank 1" in line and "Input/output error" in line for line in lines), lines
    stage = base / "runs" / "eio" / "base_train"
    assert checkpoints(stage) == ["latest", "step_000002"]
    rerun = launch(*args(base, "eio", "nproc=2"), env_base=base)
    assert rerun.returncode == 0, rerun.stderr
    assert outcome(stage) == expected


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real filesystem that fills up: a tmpfs of a given size (root, as in CI), or a skip where mounting is not
    allowed, which CI turns into a failure (NANOCHAT_REQUIRE_TMPFS=1)."""
    mounted = []

    def mount(size_kib: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            if os.environ.get("NANOCHAT_REQUIRE_TMPFS"):
                pytest.fail(f"cannot mount a tmpfs: {result.stderr.strip()}")
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    def resize(point: Path, size_kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(point)], check=True)

    mount.resize = resize
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_disk_stops_in_one_line_and_the_run_resumes_once_there_is_room(base, interrupted, small_tmpfs):
    expected = reference(base)
    one = next((interrupted / "base_train" / "checkpoints").glob("step_*"))
    size = sum(f.stat().st_size for f in one.iterdir() if f.is_file())
    disk = small_tmpfs(int(1.5 * size / 1024) + 256)  # room for the step-2 checkpoint, not for step 4 beside it
    failed = launch(*args(base, "full", runs_root=disk), env_base=base)
    line = one_line_error(failed, "No space left on device", "free", "run the same command again")
    stage = disk / "full" / "base_train"
    saved = [c for c in checkpoints(stage) if c.startswith("step_")]
    assert saved and not list((stage / "checkpoints").glob(".step_*")), (line, checkpoints(stage))
    assert "may not fit" in failed.stdout  # said before the save that failed
    # the same command on a disk still full: one line, rc 2
    again = launch(*args(base, "full", runs_root=disk), env_base=base)
    one_line_error(again)
    assert [c for c in checkpoints(stage) if c.startswith("step_")] == saved
    small_tmpfs.resize(disk, 64 * 1024)
    rerun = launch(*args(base, "full", runs_root=disk), env_base=base)
    assert rerun.returncode == 0, rerun.stderr
    assert outcome(stage) == expected


@pytest.fixture(scope="module")
def interrupted(base):
    """A run stopped by USR2 during its step-4 save (the test hook holds each save for a second), so at step 5:
    checkpoints step 4 and step 5, the newest to be damaged."""
    name = "interrupted"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_TEST_CKPT_PAUSE_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.launch", *args(base, name)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stage = base / "runs" / name / "base_train"
    deadline = time.time() + 300
    while not (stage / "checkpoints" / ".step_000004.tmp").is_dir() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert "stopped at step 5/8" in out + err, out + err
    assert checkpoints(stage) == ["latest", "step_000004", "step_000005"]
    return base / "runs" / name


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "emptied": lambda p: p.write_bytes(b""),
    "bit-flipped": lambda p: p.write_bytes(_flip(p.read_bytes())),
    "garbage": lambda p: p.write_bytes(os.urandom(p.stat().st_size)),
    "deleted": lambda p: p.unlink(),
}


def _flip(data: bytes) -> bytes:  # 64 random bytes in the middle, as the storage fault that was reported
    middle = len(data) // 2
    return data[:middle] + os.urandom(64) + data[middle + 64:]


@pytest.mark.parametrize("victim, damage", [
    ("model.pt", "truncated"), ("optim_rank0.pt", "bit-flipped"), ("state_rank0.pt", "emptied"),
    ("model.pt", "garbage"), ("optim_rank0.pt", "deleted"), ("meta.json", "deleted"),
    ("manifest_rank0.json", "garbage"), ("manifest_rank0.json", "deleted")])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_older_one_resumes(base, interrupted, tmp_path, victim,
                                                                             damage):
    expected = reference(base)
    root = tmp_path / "runs"
    shutil.copytree(interrupted, root / "damaged")
    newest = sorted((root / "damaged" / "base_train" / "checkpoints").glob("step_*"))[-1]
    DAMAGE[damage](newest / victim)
    result = launch(*args(base, "damaged", runs_root=root), env_base=base)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stdout.splitlines() if "is damaged" in line]
    assert len(warning) == 1 and victim in warning[0] and f"{newest.name}.corrupt" in warning[0], result.stdout
    assert (newest.parent / f"{newest.name}.corrupt").is_dir()  # set aside, not deleted
    assert outcome(root / "damaged" / "base_train") == expected


class Payload:
    """A pickle that, when unpickled, creates a file: proof that loading ran code."""

    def __init__(self, proof: Path):
        self.proof = proof

    def __reduce__(self):
        return os.system, (f"touch {self.proof}",)


@pytest.mark.parametrize("victim", ["model.pt", "optim_rank0.pt", "state_rank0.pt"])
def test_a_planted_pickle_in_a_checkpoint_never_runs(base, interrupted, tmp_path, victim):
    import pickle

    expected = reference(base)
    root, proof = tmp_path / "runs", tmp_path / "pwned"
    shutil.copytree(interrupted, root / "planted")
    newest = sorted((root / "planted" / "base_train" / "checkpoints").glob("step_*"))[-1]
    (newest / victim).write_bytes(pickle.dumps({"state": Payload(proof)}))
    # as a checkpoint from before manifests (no manifest, none promised in meta.json): only the loader stands
    (newest / "manifest_rank0.json").unlink()
    meta = json.loads((newest / "meta.json").read_text())
    (newest / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "manifests"}))
    result = launch(*args(base, "planted", runs_root=root), env_base=base)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not proof.exists(), "the planted pickle ran"
    assert any("is damaged" in line and victim in line for line in result.stdout.splitlines()), result.stdout
    assert outcome(root / "planted" / "base_train") == expected
