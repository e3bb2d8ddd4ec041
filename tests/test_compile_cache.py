"""Compile caches: each node's ranks compile into a working cache on local disk, seeded once per node from the
shared cache; rank 0 puts its working cache in the shared one's place, whole, at the end of a job."""

import subprocess
import sys

from nanochat import compile_cache
from nanochat.compile_cache import SHARED_ENV, WORKDIR_ENV

SEED_ONE_RANK = "from nanochat import compile_cache; compile_cache.seed()"


def test_the_ranks_of_a_node_seed_it_once_and_rank_0_publishes_whole(tmp_path, monkeypatch):
    shared, work = tmp_path / "shared", tmp_path / "node" / "work"
    (shared / "inductor").mkdir(parents=True)
    (shared / "inductor" / "kernel.py").write_text("compiled by the last run")
    monkeypatch.setenv(SHARED_ENV, str(shared))
    monkeypatch.setenv(WORKDIR_ENV, str(work))
    # four ranks of one node at once: one copies, the others wait for it on the node's lock
    ranks = [subprocess.Popen([sys.executable, "-c", SEED_ONE_RANK]) for _ in range(4)]
    assert [rank.wait(timeout=60) for rank in ranks] == [0] * 4
    assert (work / "inductor" / "kernel.py").read_text() == "compiled by the last run"
    (work / "inductor" / "kernel.py").write_text("recompiled")  # a later seed must not overwrite this run's work
    compile_cache.seed()
    assert (work / "inductor" / "kernel.py").read_text() == "recompiled"

    (work / "triton").mkdir()
    (work / "triton" / "new.cubin").write_text("compiled by this run")
    compile_cache.publish(rank=1)  # only rank 0 writes the shared cache
    assert not (shared / "triton").exists()
    compile_cache.publish(rank=0)
    assert (shared / "triton" / "new.cubin").read_text() == "compiled by this run"
    assert (shared / "inductor" / "kernel.py").read_text() == "recompiled"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node", "shared"]  # no copy or old cache left beside it
    assert not list(shared.glob(f"{compile_cache.SEEDED}*")) and not (shared / ".lock").exists()

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job's next run on this node seeds again
    (work / "triton" / "new.cubin").write_text("stale")
    compile_cache.seed()
    assert (work / "triton" / "new.cubin").read_text() == "compiled by this run"


def test_a_cache_that_cannot_be_copied_starts_cold_instead_of_failing(tmp_path, monkeypatch, capsys):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "unreadable").mkdir(mode=0)  # what a copy that fails midway meets
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(SHARED_ENV, str(tmp_path / "shared"))
    monkeypatch.setenv(WORKDIR_ENV, str(tmp_path / "file" / "work"))  # cannot be made
    compile_cache.seed()
    assert "compile cache: starting cold" in capsys.readouterr().out


def test_without_a_shared_cache_nothing_happens(tmp_path, monkeypatch):
    monkeypatch.delenv(SHARED_ENV, raising=False)
    monkeypatch.setenv(WORKDIR_ENV, str(tmp_path / "work"))
    compile_cache.seed()
    compile_cache.publish(rank=0)
    assert not (tmp_path / "work").exists()


def test_a_copy_back_over_its_time_budget_is_given_up_and_the_shared_cache_kept(tmp_path, monkeypatch, capsys):
    """A stop copies the cache back before Slurm's notice runs out: past its budget the copy is abandoned (the
    requeue matters more), the shared cache stays whole and nothing is left beside it."""
    shared, work = tmp_path / "shared", tmp_path / "work"
    (shared / "triton").mkdir(parents=True)
    (shared / "triton" / "old.cubin").write_text("the last run's")
    (work / "triton").mkdir(parents=True)
    (work / "triton" / "new.cubin").write_text("this run's")
    monkeypatch.setenv(SHARED_ENV, str(shared))
    monkeypatch.setenv(WORKDIR_ENV, str(work))
    compile_cache.publish(rank=0, budget_s=0)
    assert "compile cache not saved" in capsys.readouterr().out
    assert sorted(p.name for p in (shared / "triton").iterdir()) == ["old.cubin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared", "work"]
    compile_cache.publish(rank=0, budget_s=60)
    assert sorted(p.name for p in (shared / "triton").iterdir()) == ["new.cubin"]
