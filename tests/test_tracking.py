import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from nanochat.config import Config
from nanochat.runs import Run
from nanochat.tracking import Tracker, record_summary


def test_disabled_never_imports_wandb(tmp_path):
    code = ("import sys; from types import SimpleNamespace as S; from nanochat.runs import Run; "
            "from nanochat.tracking import Tracker; "
            f"t = Tracker(S(wandb='disabled', wandb_project='p'), Run({str(tmp_path)!r}), 'base_train', rank=0); "
            "t.log({'step': 1}); t.finish({}); print('wandb' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_offline_mode_needs_no_network_and_keeps_its_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # any network use would fail
    cfg, run = SimpleNamespace(wandb="offline", wandb_project="nanochat"), Run(tmp_path / "run")
    ids = []
    for attempt in range(2):  # a requeued stage logs into the same wandb run
        tracker = Tracker(cfg, run, "base_train", rank=0)
        tracker.log({"step": attempt, "loss": 1.0})
        tracker.finish({"loss": 1.0})
        ids.append(tracker.wandb_run.id)
    assert ids[0] == ids[1] == (run.stage_dir("base_train") / "wandb_id").read_text()
    assert list(run.stage_dir("base_train").rglob("*.wandb"))


def test_offline_run_has_the_config_group_job_type_and_the_evaluation_figures(tmp_path, monkeypatch):
    """What a researcher looks for in wandb: the resolved config, the stages of one run grouped, and an evaluation
    stage's figures (CORE, ChatCORE) as its summary; read back from the offline run's own files."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    cfg = Config(wandb="offline", depth=6, matrix_lr=0.01)
    run = Run(tmp_path / "d6-try")
    record_summary(cfg, run, "chat_eval_sft", 0, {"chatcore": 0.25, "GSM8K": 0.5, "samples": ["a"]})
    # the offline log is protobuf records (wandb 0.31 ships no reader): its strings are there as they were sent,
    # written by wandb's service process, which may still be flushing when finish() returns (1 read in 5)
    deadline, log = time.time() + 30, b""
    while b"chatcore" not in log and time.time() < deadline:
        time.sleep(0.1)
        log = b"".join(p.read_bytes() for p in run.stage_dir("chat_eval_sft").rglob("*.wandb"))
    assert log.count(b"d6-try") >= 2 and b"chat_eval_sft" in log  # name and group; the job type
    assert re.search(rb"matrix_lr.{0,8}0\.01", log, re.S) and re.search(rb"depth.{0,8}6", log, re.S)
    assert re.search(rb"chatcore.{0,8}0\.25", log, re.S) and re.search(rb"GSM8K.{0,8}0\.5", log, re.S)


def test_only_rank_zero_tracks(tmp_path):
    tracker = Tracker(SimpleNamespace(wandb="online", wandb_project="p"), Run(tmp_path), "base_train", rank=1)
    assert tracker.wandb_run is None
