import subprocess
import sys
from types import SimpleNamespace

import pytest

from nanochat.runs import Run
from nanochat.tracking import Tracker


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


def test_only_rank_zero_tracks(tmp_path):
    tracker = Tracker(SimpleNamespace(wandb="online", wandb_project="p"), Run(tmp_path), "base_train", rank=1)
    assert tracker.wandb_run is None
