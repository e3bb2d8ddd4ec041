"""What a site's profile puts into the job script (experiments/slurm.py): sbatch options, the CPU job's own
partition/account/QoS, srun's --cpus-per-task, containers, and export lines that expand shell variables in the job
without running anything. The scripts are the ones submitit would hand to sbatch; the export lines run in bash."""

import os
import subprocess
from pathlib import Path

import pytest

from experiments.config import load_config
from experiments.launch import main
from experiments.slurm import REPO, executor, job_env, sbatch_refusal
from test_sweep import fake_slurm  # noqa: F401 (fixture)

FOLDER = Path("/shared/runs/r1/slurm")


def script(*overrides: str, gpu: bool = True) -> str:
    cfg = load_config(["+cluster=h100", *overrides])
    ex = executor(FOLDER, cfg.cluster, gpu=gpu, env=job_env(cfg))
    return ex._make_submission_file_text(ex._submitit_command_str, "uid")


def sbatch_lines(text: str) -> set[str]:
    return {line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")}


def srun_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("srun "))


def test_a_profiles_sbatch_options_reach_the_gpu_job():
    text = script("+cluster.sbatch.reservation=maint", "+cluster.sbatch.exclusive=true", "+cluster.sbatch.mem=0",
                  "+cluster.sbatch.exclude='gpu[01-02]'", "+cluster.sbatch.gres='gpu:a100:4'",
                  "+cluster.sbatch.mem_per_cpu=4G", "+cluster.sbatch.hint=null", "+cluster.sbatch.overcommit=false")
    assert {"--reservation=maint", "--exclusive", "--mem=0", "--exclude='gpu[01-02]'", "--gres=gpu:a100:4",
            "--mem-per-cpu=4G", "--requeue"} <= sbatch_lines(text)
    assert not any(line.startswith(("--hint", "--overcommit")) for line in sbatch_lines(text))
    assert "--reservation=maint" not in sbatch_lines(script("+cluster.sbatch.reservation=maint", gpu=False))


@pytest.mark.parametrize("override, message", [
    ("+cluster.sbatch.Exclude=n1", "'Exclude' is not an sbatch long option name"),
    ("+cluster.sbatch.exclude=[n1,n2]", "cluster.sbatch.exclude: ['n1', 'n2'] is not one sbatch value"),
    ("+cluster.sbatch.gres={gpu:4}", "cluster.sbatch.gres: {'gpu': 4} is not one sbatch value"),
    ("+cluster.sbatch.output=x.log", "cluster.sbatch.output: the harness sets --output itself"),
    ("+cluster.cpu_job.sbatch.kill_on_invalid_dep=no", "cluster.cpu_job.sbatch.kill_on_invalid_dep: the harness sets"),
    ("cluster.container.kind=docker", "cluster.container.kind='docker'; valid: pyxis, apptainer"),
    ("cluster.container.kind=pyxis", "cluster.container.image is not set"),
    ("cluster.interface='^docker0,lo'", "cluster.interface='^docker0,lo': it must name one interface, e.g. ib0"),
    ("cluster.interface='ib0,ib1'", "cluster.interface='ib0,ib1': it must name one interface"),
    ("cluster.interface='=ib0'", "cluster.interface='=ib0': it must name one interface"),
])
def test_a_malformed_profile_entry_is_one_line(tmp_path, monkeypatch, capsys, override, message):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (tmp_path / "bin").mkdir()  # a PATH with Slurm's commands, each failing: the profile fails before any runs
    for command in ("sbatch", "srun"):
        (tmp_path / "bin" / command).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / "bin" / command).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main(["+cluster=h100", "run_name=site", "stages=[tok_train,base_train]", "dataset=embedded",
                 "cluster.gpus_per_node=1", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_the_cpu_job_has_its_own_partition_account_and_qos():
    text = script("cluster.account=gpu-acct", "cluster.qos=gpu-qos", "cluster.constraint=h100",
                  "cluster.cpu_job.partition=cpu", "cluster.cpu_job.account=cpu-acct", "cluster.cpu_job.qos=cpu-qos",
                  gpu=False)
    assert {"--partition=cpu", "--account=cpu-acct", "--qos=cpu-qos"} <= sbatch_lines(text)
    assert not any(line.startswith("--constraint") for line in sbatch_lines(text))  # the GPUs' constraint
    inherited = sbatch_lines(script("cluster.account=gpu-acct", "cluster.qos=gpu-qos", gpu=False))
    assert {"--partition=h100", "--account=gpu-acct", "--qos=gpu-qos"} <= inherited
    gpu = sbatch_lines(script("cluster.account=gpu-acct", "cluster.cpu_job.account=cpu-acct",
                              "cluster.constraint=h100"))
    assert {"--partition=h100", "--account=gpu-acct", "--constraint=h100"} <= gpu


def test_srun_gets_the_cpus_per_task_and_omp_threads_follow_them_unless_the_profile_sets_them():
    assert "--cpus-per-task=12" in srun_line(script()).split()
    assert "--cpus-per-task=16" in srun_line(script(gpu=False)).split()
    assert 'export OMP_NUM_THREADS="8"' in script()  # h100.yaml sets 8 of its 12
    unset = script("~cluster.env.OMP_NUM_THREADS")
    assert 'export OMP_NUM_THREADS="12"' in unset and 'export OMP_NUM_THREADS="16"' in script(
        "~cluster.env.OMP_NUM_THREADS", gpu=False)


def setup_lines(text: str) -> str:
    """The script's set-up up to the batch step's own work (before_srun.sh needs a job)."""
    lines = text.split("# setup\n", 1)[1].splitlines()
    return "\n".join(lines[:lines.index("set +e")])


def test_export_lines_expand_variables_in_the_job_append_to_pythonpath_and_clear_torchrun_variables(tmp_path):
    marker = tmp_path / "ran"
    text = script("cluster.compile_cache='$SCRATCH/cache dir'", "cluster.base_dir='/data/$USER'",
                  f"+cluster.env.TRICKY='\"q\" `touch {marker}` $(touch {marker}) \\ end'",
                  "cluster.setup=['module load cuda']", "cluster.interface=ib0")
    shell = f"module() {{ export PYTHONPATH=/from/module; }}\n{setup_lines(text)}\nenv -0"
    leaked = {"MASTER_ADDR": "elsewhere", "MASTER_PORT": "1", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
              "LOCAL_WORLD_SIZE": "4"}
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ["PATH"], "SCRATCH": "/scratch/me", "USER": "me", "TMPDIR": "/local",
                              "SLURM_JOB_ID": "42", **leaked}).stdout
    env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    # compiled on the node's disk, seeded from and saved to the shared cache (nanochat.compile_cache)
    assert env["NANOCHAT_COMPILE_CACHE"] == "/scratch/me/cache dir"
    assert env["TRITON_CACHE_DIR"] == "/local/nanochat-compile-me/triton"  # the same path in every job
    assert env["TORCHINDUCTOR_CACHE_DIR"] == env["NANOCHAT_COMPILE_WORKDIR"] + "/inductor"
    assert env["NANOCHAT_BASE_DIR"] == "/data/me"
    assert env["PYTHONPATH"] == f"{REPO}:/from/module"
    assert env["TRICKY"] == f'"q" `touch {marker}` $(touch {marker}) \\ end' and not marker.exists()
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "ib0"
    assert env["NANOCHAT_VERDICT_DIR"] == str(FOLDER)
    assert not set(leaked) & set(env)


def test_pyxis_runs_the_tasks_in_the_image_with_the_run_and_repo_mounted():
    text = script("cluster.container.kind=pyxis", "cluster.container.image='nvcr.io#nvidia/pytorch:24.05-py3'",
                  "cluster.container.mounts=[/lustre:/lustre]", "cluster.base_dir=/lustre/nanochat")
    srun = srun_line(text)
    mounts = f"/lustre:/lustre,{REPO}:{REPO},{FOLDER.parent}:{FOLDER.parent},/lustre/nanochat:/lustre/nanochat"
    assert "--container-image=nvcr.io#nvidia/pytorch:24.05-py3" in srun and f"--container-mounts={mounts}" in srun
    assert srun.endswith(f"python -u -m submitit.core._submit {FOLDER}")  # the image's python, not this one's


def test_apptainer_wraps_the_tasks_python():
    text = script("cluster.container.kind=apptainer", "cluster.container.image=/images/nanochat.sif",
                  "cluster.python=python3", "cluster.base_dir=/data")
    srun = srun_line(text)
    assert "--container-image" not in srun
    assert srun.endswith(f"apptainer exec --nv --bind {REPO}:{REPO},{FOLDER.parent}:{FOLDER.parent},/data:/data "
                         f"/images/nanochat.sif python3 -u -m submitit.core._submit {FOLDER}")
    cpu = srun_line(script("cluster.container.kind=apptainer", "cluster.container.image=/i.sif", gpu=False))
    assert "apptainer exec --bind" in cpu  # no --nv where there is no GPU


def test_container_mounts_and_image_expand_shell_variables(monkeypatch):
    # srun's arguments are quoted in the job script, where no shell would expand them
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    box = ("cluster.container.mounts=['$SCRATCH:/scratch','$SCRATCH/data']", "cluster.base_dir=/data")
    pyxis = srun_line(script("cluster.container.kind=pyxis", "cluster.container.image='$SCRATCH/nanochat.sqsh'", *box))
    assert "--container-image=/scratch/me/nanochat.sqsh" in pyxis and "$" not in pyxis
    assert f"--container-mounts=/scratch/me:/scratch,/scratch/me/data,{REPO}:{REPO}," in pyxis
    apptainer = srun_line(script("cluster.container.kind=apptainer", "cluster.container.image='$SCRATCH/n.sif'", *box))
    assert "--bind /scratch/me:/scratch,/scratch/me/data," in apptainer and " /scratch/me/n.sif python " in apptainer


def test_a_refusal_is_slurms_reason_on_one_line():
    from submitit.core.utils import FailedJobError

    stderr = ("sbatch: error: invalid partition specified: nope\n"
              "sbatch: error: Batch job submission failed: Invalid partition name specified")
    assert sbatch_refusal(FailedJobError(stderr)) == ("invalid partition specified: nope; Batch job submission "
                                                      "failed: Invalid partition name specified")


def test_runs_root_expands_shell_variables(monkeypatch):
    from nanochat.runs import resolve_runs_root

    monkeypatch.setenv("USER", "me")
    assert resolve_runs_root(cluster_runs_root="/scratch/$USER/runs") == Path("/scratch/me/runs")


@pytest.fixture
def fake_scancel(fake_slurm):  # noqa: F811 (fixture)
    """An scancel that records its arguments in `scancelled`: no real job is touched."""
    (fake_slurm / "scancel").write_text('#!/bin/bash\necho "$@" >> "$FAKE_SLURM/scancelled"\n')
    (fake_slurm / "scancel").chmod(0o755)
    return fake_slurm


def single_run(tmp_path, monkeypatch, capsys, *overrides) -> tuple[int, str, str]:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    code = main(["+cluster=localslurm", "run_name=single", "stages=[tok_train,base_train]", *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_single_runs_gpu_job_is_cancelled_if_its_tokenizer_job_fails(fake_scancel, tmp_path, monkeypatch, capsys):
    code, out, _ = single_run(tmp_path, monkeypatch, capsys)
    assert code == 0 and out.startswith("Submitted job 1002\n")
    gpu = (fake_scancel / "1002.sh").read_text()
    assert "#SBATCH --dependency=afterok:1001" in gpu and "#SBATCH --kill-on-invalid-dep=yes" in gpu


def test_a_refused_gpu_job_cancels_the_tokenizer_job_submitted_before_it(fake_scancel, tmp_path, monkeypatch, capsys):
    (fake_scancel / "refuse").write_text("--reservation=gone")  # only in the GPU job's script
    code, out, err = single_run(tmp_path, monkeypatch, capsys, "+cluster.sbatch.reservation=gone")
    assert code == 2 and out == ""
    assert err == ("error: sbatch refused the GPU job of run single: Batch job submission failed: Invalid qos "
                   "specification (tokenizer job 1001, submitted before it, cancelled)\n")
    assert (fake_scancel / "scancelled").read_text() == "1001\n"
    assert not (tmp_path / "base" / "runs" / "single" / "slurm" / "jobs.jsonl").exists()
