"""The local dev cluster (slurm/dev/up.sh) does what the harness relies on: multi-node steps, accounting,
submitit jobs across nodes, a quick requeue; and it is as hostile as real sites: 2 CPUs and 2 GPUs per node,
preemption with a grace time, scancel, tasks without Slurm commands, nodes that die, ranks that hang.
Run with the cluster up: ``pytest -m slurm``."""
import sys
import time

import pytest

from slurm_fixtures import (CANCEL_PARTITION, GRACE_TIME, HIDE_SLURM_COMMANDS, KILL_WAIT, NODES,  # noqa: F401
                            PARTITION, freeze_rank, job_field, job_pythonpath_setup, node_killer, node_state,
                            preempt, revive_node, sacct_runs, sbatch, sh, slurm_cluster, task_identity,
                            thaw_rank, wait_for, wait_state)

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def two_node_job(slurm_cluster, tmp_path_factory):
    """One batch job on both nodes (one task each), submitted with ``sbatch --wait``: (job id, its output)."""
    out = tmp_path_factory.mktemp("two_node") / "out.txt"
    script = "#!/bin/bash\nsrun bash -c 'echo \"rank=$SLURM_PROCID node=$SLURMD_NODENAME\"'\n"
    jobid = sbatch(script, "--wait", "-N2", "--ntasks-per-node=1", "-p", slurm_cluster["partition"],
                   "-t", "2", f"--output={out}", timeout=120)
    return jobid, out.read_text()


def test_two_node_step_runs_on_both_nodes(two_node_job):
    _, output = two_node_job
    lines = sorted(line for line in output.splitlines() if line.startswith("rank="))
    assert lines == ["rank=0 node=n1", "rank=1 node=n2"], output


def test_sacct_reports_completed(two_node_job):
    jobid, _ = two_node_job
    assert wait_state(jobid, "COMPLETED", timeout=30) == "COMPLETED"


def test_submitit_job_on_two_nodes(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition=slurm_cluster["partition"], timeout_min=5, nodes=2,
                               tasks_per_node=1, cpus_per_task=1, slurm_setup=job_pythonpath_setup())
    job = executor.submit(task_identity)
    # submitit's own wait has no timeout: bound it here (done() polls sacct, as wait_state does).
    wait_for(lambda: job.done(), timeout=90, what=f"submitit job {job.job_id}", poll=1)
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1], results
    assert {r["node"] for r in results} == {"n1", "n2"}, results
    assert all(r["ntasks"] == 2 for r in results), results


def test_requeue_restarts_quickly(slurm_cluster, tmp_path):
    """``scontrol requeue`` a running job: its second run (SLURM_RESTART_COUNT=1) must finish within a minute.
    Slurm holds a requeued job for cred_expire+1 s (121 s by default); up.sh sets cred_expire=10."""
    marker, log = tmp_path / "first_run_started", tmp_path / "runs.log"
    # No --requeue flag: JobRequeue=1 in slurm.conf makes every job requeue-able, which submitit relies on.
    script = f"""#!/bin/bash
echo "restart=${{SLURM_RESTART_COUNT:-0}} node=$SLURMD_NODENAME" >> {log}
if [ ! -e {marker} ]; then touch {marker}; sleep 300; fi
echo finished >> {log}
"""
    jobid = sbatch(script, "-N1", "-p", slurm_cluster["partition"], "-t", "10", "--open-mode=append",
                   f"--output={tmp_path / 'out.txt'}")
    wait_for(marker.exists, timeout=30, what="the job's first run to start")
    requeued_at = time.monotonic()
    sh("scontrol", "requeue", str(jobid))
    wait_state(jobid, "COMPLETED", timeout=60)
    elapsed = time.monotonic() - requeued_at
    runs = log.read_text().splitlines()
    assert [r.split()[0] for r in runs] == ["restart=0", "restart=1", "finished"], runs
    assert job_field(jobid, "Restarts") == "1"
    assert elapsed < 60, f"requeue to completion took {elapsed:.0f}s"


# ------------------------------------------------------------------------------ the "hostile" site features
def node_info() -> dict[str, tuple[str, str, str]]:
    out = sh("sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t %c %G")
    return {n: (state, cpus, gres) for n, state, cpus, gres in (line.split() for line in out.splitlines())}


def test_three_idle_nodes_with_two_cpus_and_two_gpus(slurm_cluster):
    assert node_info() == {n: ("idle", "2", "gpu:2") for n in NODES}
    partitions = sh("sinfo", "-h", "-o", "%R").split()
    assert sorted(partitions) == sorted(slurm_cluster["partitions"])


def srun_env(*args: str, var: str = "CUDA_VISIBLE_DEVICES") -> list[tuple[str, str, str]]:
    """(node, SLURM_LOCALID, $var or "unset") of each task of an ``srun ARGS``, in rank order."""
    out = sh("srun", "-p", PARTITION, "-t", "1", *args, "bash", "-c",
             f'echo "$SLURM_PROCID $SLURMD_NODENAME $SLURM_LOCALID ${{{var}-unset}}"', timeout=60)
    rows = sorted(line.split() for line in out.splitlines())
    return [tuple(row[1:]) for row in rows]


def test_four_ranks_on_two_nodes_have_local_ids_0_and_1(slurm_cluster):
    rows = srun_env("-N2", "-n4")
    nodes = sorted({node for node, _, _ in rows})
    assert len(nodes) == 2, rows
    assert sorted((node, lid) for node, lid, _ in rows) == [(n, lid) for n in nodes for lid in ("0", "1")]
    assert all(cvd == "unset" for _, _, cvd in rows), rows   # no GPUs asked, none given


def test_cuda_visible_devices_per_task(slurm_cluster):
    # --gpus-per-task=1: each task of a node sees its own GPU.
    assert sorted(cvd for _, _, cvd in srun_env("-N1", "-n2", "--gpus-per-task=1")) == ["0", "1"]
    # --gpus-per-node=2: every task sees both GPUs of its node.
    rows = srun_env("-N2", "--ntasks-per-node=2", "--gpus-per-node=2")
    assert [cvd for _, _, cvd in rows] == ["0,1"] * 4, rows


# A job that records when its batch shell and its srun task get SIGTERM (each TERM appends a timestamp to
# batch.term / task.term) and when they last ran (*.alive, rewritten every 0.2 s until SIGKILL). Every run
# appends $SLURM_RESTART_COUNT to runs; a rerun after a requeue just ends.
VICTIM = """#!/bin/bash
d={d}
r=${{SLURM_RESTART_COUNT:-0}}
echo "$r" >> $d/runs
[ "$r" = 0 ] || exit 0
trap 'date +%s.%N >> $d/batch.term' TERM
srun bash -c 'trap "date +%s.%N >> {d}/task.term" TERM; while :; do date +%s.%N > {d}/task.alive; sleep 0.2; done' &
while :; do date +%s.%N > $d/batch.alive; sleep 0.2; done
"""


def start_victim(d, partition: str, *args: str) -> int:
    """Submit VICTIM writing into directory ``d``, holding a whole node (-c 2), and wait until its task runs."""
    jobid = sbatch(VICTIM.format(d=d), "-p", partition, "-n1", "-c2", "-t", "5", *args, f"--output={d / 'out'}")
    try:
        wait_for((d / "task.alive").exists, timeout=30, what=f"job {jobid}'s task to start")
    except TimeoutError:
        sh("scancel", str(jobid), check=False)
        raise
    return jobid


def times(path) -> list[float]:
    """The timestamps in a file the job writes; [] if there is none. ``date > file`` empties the file before it
    writes: an empty file is read again a moment later."""
    for _ in range(50):
        if not path.exists():
            return []
        text = path.read_text()
        if text.strip():
            return [float(t) for t in text.split()]
        time.sleep(0.01)
    raise AssertionError(f"{path} stays empty")


def wait_killed(d, timeout: float) -> None:
    """Until the victim's task and batch shell stopped writing their heartbeats (SIGKILL)."""
    def dead():
        now = time.time()
        return all(now - times(d / f"{p}.alive")[0] > 1.5 for p in ("task", "batch"))
    wait_for(dead, timeout=timeout, what=f"the job in {d} to be killed")


@pytest.fixture(scope="module")
def preempted(slurm_cluster, tmp_path_factory):
    """A victim in debug and one in cancel, preempted together by jobs in high: per partition, what happened."""
    victims, highs = {}, {}
    try:
        yield _preempt_victims(tmp_path_factory, victims, highs)
    finally:  # whatever is left of them (a failed wait): they would hold nodes for the next tests
        sh("scancel", *(str(j) for j, _ in victims.values()), *(str(j) for j in highs.values()), check=False)


def _preempt_victims(tmp_path_factory, victims, highs):
    for partition in (PARTITION, CANCEL_PARTITION):
        d = tmp_path_factory.mktemp(f"victim_{partition}")
        victims[partition] = (start_victim(d, partition), d)
    t0 = time.time()
    highs.update({partition: preempt(jobid) for partition, (jobid, _) in victims.items()})
    for jobid, d in victims.values():
        wait_for((d / "task.term").exists, timeout=20, what=f"SIGTERM to job {jobid}'s task")
    # During the grace time: what the controller shows.
    grace = {p: (job_field(j, "JobState"), job_field(j, "PreemptTime")) for p, (j, _) in victims.items()}
    for _, d in victims.values():
        wait_killed(d, timeout=GRACE_TIME + 45)   # the grace's end is noticed up to ~30 s late (see README)
    result = {}
    for partition, (jobid, d) in victims.items():
        result[partition] = {"job": jobid, "high": highs[partition], "dir": d, "grace": grace[partition],
                             "task_term": [t - t0 for t in times(d / "task.term")],
                             "batch_term": [t - t0 for t in times(d / "batch.term")],
                             "killed": times(d / "task.alive")[0] - t0}
        print(f"\npreempted in {partition}: {result[partition]}")
    return result


def check_grace(r) -> None:
    """SIGTERM to the task at once, to the batch shell only at the grace's end; SIGKILL KillWait after that."""
    assert r["task_term"] and r["task_term"][0] < 5, r
    assert r["killed"] - r["task_term"][0] >= GRACE_TIME - 2, r
    assert r["batch_term"] and r["batch_term"][0] >= r["task_term"][0] + GRACE_TIME - 2, r
    assert KILL_WAIT - 2 <= r["killed"] - r["batch_term"][0] <= KILL_WAIT + 3, r
    state, preempt_time = r["grace"]
    assert state == "RUNNING" and preempt_time not in (None, "None"), r


def test_preemption_in_debug_terms_then_requeues(preempted):
    r = preempted[PARTITION]
    check_grace(r)
    # The rerun, after the high job's 5 s and the requeue hold. Not wait_state: until the rerun starts, sacct
    # may show the first run's PREEMPTED, a final state for anything but a requeued job.
    wait_for(lambda: sacct_runs(r["job"])[-1:] == ["COMPLETED"], timeout=60, what=f"job {r['job']}'s rerun")
    assert (r["dir"] / "runs").read_text().split() == ["0", "1"]   # SLURM_RESTART_COUNT of each run
    assert sacct_runs(r["job"]) == ["PREEMPTED", "COMPLETED"]
    assert job_field(r["job"], "Restarts") == "1"


def test_preemption_in_cancel_terms_then_ends_preempted(preempted):
    r = preempted[CANCEL_PARTITION]
    check_grace(r)
    assert wait_state(r["job"], "PREEMPTED", timeout=30) == "PREEMPTED"
    assert (r["dir"] / "runs").read_text().split() == ["0"]
    assert job_field(r["job"], "Restarts") == "0"


def test_scancel_terms_batch_shell_and_tasks_then_kills(slurm_cluster, tmp_path):
    jobid = start_victim(tmp_path, PARTITION)
    t0 = time.time()
    sh("scancel", str(jobid))
    wait_killed(tmp_path, timeout=KILL_WAIT + 10)   # (a victim that never started is cancelled already)
    task_term, batch_term = times(tmp_path / "task.term"), times(tmp_path / "batch.term")
    killed = times(tmp_path / "task.alive")[0]
    print(f"\nscancel: TERM task +{task_term[0] - t0:.2f}s batch +{batch_term[0] - t0:.2f}s, KILL +{killed - t0:.2f}s")
    assert task_term[0] - t0 < 2 and batch_term[0] - t0 < 2
    assert KILL_WAIT - 2 <= killed - task_term[0] <= KILL_WAIT + 3
    assert wait_state(jobid, "CANCELLED", timeout=30) == "CANCELLED"


def test_hidden_slurm_commands_in_a_task(slurm_cluster, tmp_path):
    probe = ("import subprocess\n"
             "for c in ('scontrol', 'srun', 'sacct', 'squeue', 'sbatch', 'scancel'):\n"
             "    try: subprocess.run([c, '--version'], capture_output=True); print(c, 'ran')\n"
             "    except OSError as e: print(c, type(e).__name__)\n")
    (tmp_path / "probe.py").write_text(probe)
    script = (f"#!/bin/bash\nscontrol ping >/dev/null && echo batch scontrol ok\n"
              f"srun {HIDE_SLURM_COMMANDS} {sys.executable} {tmp_path / 'probe.py'}\n"
              f"scontrol ping >/dev/null && echo batch scontrol still ok\n")
    out = tmp_path / "out"
    sbatch(script, "--wait", "-p", PARTITION, "-n1", "-t", "2", f"--output={out}", timeout=60)
    lines = out.read_text().splitlines()
    assert lines == ["batch scontrol ok", "scontrol FileNotFoundError", "srun FileNotFoundError",
                     "sacct FileNotFoundError", "squeue FileNotFoundError", "sbatch FileNotFoundError",
                     "scancel FileNotFoundError", "batch scontrol still ok"], lines


def test_kill_node_fails_its_job_and_revive_brings_it_back(node_killer, tmp_path):
    node = NODES[-1]
    jobid = sbatch("#!/bin/bash\nsrun sleep 300\n", "-p", PARTITION, "-w", node, "-n1", "-t", "5",
                   f"--output={tmp_path / 'out'}")
    wait_for(lambda: job_field(jobid, "JobState") == "RUNNING", timeout=30, what=f"job {jobid} to run")
    t0 = time.monotonic()
    node_killer(node)
    not_responding = wait_for(lambda: node_state(node).endswith("*") and time.monotonic() - t0,
                              timeout=30, what=f"{node} to be not responding")
    down = wait_for(lambda: node_state(node).startswith("down") and time.monotonic() - t0,
                    timeout=40, what=f"{node} to be DOWN")
    # The job's run on the dead node ends NODE_FAIL; JobRequeue=1 puts it back in the queue (-w: for that node).
    wait_for(lambda: sacct_runs(jobid)[:1] == ["NODE_FAIL"], timeout=15, what=f"job {jobid} to fail")
    print(f"\nkill-node {node}: not responding after {not_responding:.1f}s, DOWN after {down:.1f}s, "
          f"job {jobid}: {sacct_runs(jobid)}, now {job_field(jobid, 'JobState')}")
    sh("scancel", str(jobid))
    t0 = time.monotonic()
    revive_node(node)
    print(f"revive-node {node}: usable after {time.monotonic() - t0:.1f}s")
    assert sh("srun", "-p", PARTITION, "-w", node, "-t", "1", "hostname", timeout=60) == node


def test_freeze_and_thaw_a_rank(slurm_cluster, tmp_path):
    tick = f"while :; do date +%s.%N > {tmp_path}/rank$SLURM_PROCID; sleep 0.1; done"
    jobid = sbatch(f"#!/bin/bash\nsrun bash -c '{tick}'\n", "-p", PARTITION, "-N1", "-n2", "-t", "2",
                   f"--output={tmp_path / 'out'}")
    try:
        ages = lambda: {r: time.time() - times(tmp_path / f"rank{r}")[0] for r in (0, 1)}  # noqa: E731
        wait_for(lambda: all((tmp_path / f"rank{r}").exists() for r in (0, 1)), 30, "both ranks to tick")
        freeze_rank(jobid, 1)
        time.sleep(1.5)
        frozen = ages()
        assert frozen[1] > 1.2 and frozen[0] < 0.5, frozen
        thaw_rank(jobid, 1)
        time.sleep(0.5)
        thawed = ages()
        assert thawed[1] < 0.5 and thawed[0] < 0.5, thawed
    finally:
        sh("scancel", str(jobid))
