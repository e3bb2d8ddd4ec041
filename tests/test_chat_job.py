"""The chat job without Slurm: its server (experiments.chat.serve_in_job) finds a run by name under the cluster
profile's runs_root, the job's arguments going through chat_web's real parser down to find_chat_model; and the
`ssh` lines printed at the prompt name the login node (and a bastion) as `cluster.login_host`/`jump_host` say; the
submission against a fake sbatch/scancel cancels a job whose wait ends unserved; slurm/chat.slurm's token folder."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from nanochat.common import UserError  # noqa: E402
from nanochat.model_io import find_chat_model  # noqa: E402
from test_chat_cli import run_folder  # noqa: E402, F401 (fixture)
from test_site_options import fake_scancel  # noqa: E402, F401 (fixture)
from test_sweep import fake_slurm  # noqa: E402, F401 (fixture)

from experiments.chat import chat_executor, main, serve_in_job, ssh_lines  # noqa: E402
from experiments.config import load_config  # noqa: E402


def serve_until_found(monkeypatch, tmp_path, runs_root) -> list:
    """Run serve_in_job for run 'tiny-d2' up to the model lookup; the lookups' results (none if it failed)."""
    found = []

    def find_then_stop(*args, **kwargs):  # stops chat_web before it loads the model and serves
        found.append(find_chat_model(*args, **kwargs))
        raise UserError("found")

    monkeypatch.setattr("nanochat.model_io.find_chat_model", find_then_stop)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "elsewhere"))  # the default runs_root has no runs
    monkeypatch.delenv("SLURM_SUBMIT_HOST", raising=False)
    assert serve_in_job("tiny-d2", None, str(tmp_path / "server.json"), str(tmp_path / "server.token"), 1.0,
                        runs_root) == 2
    return found


def test_the_chat_job_finds_a_run_under_the_profiles_runs_root(run_folder, tmp_path, monkeypatch):  # noqa: F811
    found = serve_until_found(monkeypatch, tmp_path, str(run_folder.parent))
    assert found == [(run_folder / "base_train" / "checkpoints", run_folder / "tok_train" / "tokenizer", False)]


def test_without_a_runs_root_the_job_looks_in_the_default_one(run_folder, tmp_path, monkeypatch):  # noqa: F811
    assert serve_until_found(monkeypatch, tmp_path, None) == []
    with pytest.raises(UserError, match="no run named 'tiny-d2'"):
        find_chat_model("tiny-d2", runs_root=None)


def tunnel(*overrides: str) -> list[str]:
    cluster = load_config(["+cluster=localslurm", *overrides]).cluster  # the keys as a user passes them
    return ssh_lines(cluster, "me", "n7", "10.1.2.3", 8123)


def test_the_ssh_lines_name_the_login_host_and_the_bastion(monkeypatch):
    monkeypatch.setattr("socket.getfqdn", lambda: "login3.internal")  # what the login node calls itself
    assert tunnel("cluster.login_host=login.uni.edu", "cluster.jump_host=bob@gw.uni.edu") == [
        "  ssh -N -L 8123:10.1.2.3:8123 -J bob@gw.uni.edu me@login.uni.edu",
        "  or: ssh -N -L 8123:10.1.2.3:8123 -J bob@gw.uni.edu,me@login.uni.edu me@n7"]
    assert tunnel("cluster.login_host=login.uni.edu") == [
        "  ssh -N -L 8123:10.1.2.3:8123 me@login.uni.edu",
        "  or: ssh -N -L 8123:10.1.2.3:8123 -J me@login.uni.edu me@n7"]


def test_without_a_login_host_the_lines_say_how_to_set_one(monkeypatch):
    monkeypatch.setattr("socket.getfqdn", lambda: "login3.internal")
    direct, jump, hint = tunnel()
    assert direct == "  ssh -N -L 8123:10.1.2.3:8123 me@login3.internal"
    assert jump == "  or: ssh -N -L 8123:10.1.2.3:8123 -J me@login3.internal me@n7"
    assert "login3.internal is the name the login node gives itself" in hint
    assert "cluster.login_host=NAME" in hint and "cluster.jump_host=NAME" in hint


def test_the_chat_jobs_batch_script_asks_for_no_requeue_and_no_signal(tmp_path):
    # the text submitit hands to sbatch (tests/test_slurm_chat.py reads what Slurm holds): a training job's
    # --requeue and --signal=USR2@... would bring the server back later, with nobody connected
    script = chat_executor(tmp_path, load_config(["+cluster=localslurm"]), 30)._make_submission_file_text("true", "x")
    assert "#SBATCH --no-requeue" in script.splitlines()
    assert "--signal" not in script and "--requeue" not in script.replace("--no-requeue", "")
    assert "after_srun" not in script and "before_srun" not in script  # the training jobs' requeue hooks


def chat_logs(tmp_path) -> str:
    return f"{tmp_path}/base/runs/chat/1001_0_log.err (errors), 1001_0_log.out (output)"


def test_ctrl_c_while_waiting_for_the_server_cancels_its_job(fake_scancel, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))

    def pressed_ctrl_c(connection_file, job):  # the user gives up while the wait polls
        raise KeyboardInterrupt

    monkeypatch.setattr("experiments.chat.server_address", pressed_ctrl_c)
    assert main(["+cluster=localslurm"]) == 130
    out, err = capsys.readouterr()
    assert (fake_scancel / "scancelled").read_text() == "1001\n"  # queued or running, it would hold a GPU
    # the .err first: a server that failed to start says why there
    assert out == f"Submitted job 1001\n  log: {chat_logs(tmp_path)}\n  waiting for the server ...\n"
    assert err == (f"error: interrupted while waiting for the chat server: cancelled job 1001, so that it does not "
                   f"hold a GPU with nobody connected; its logs: {chat_logs(tmp_path)}\n")


def test_a_server_that_does_not_answer_in_time_is_cancelled(fake_scancel, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    assert main(["+cluster=localslurm", "wait_s=0"]) == 2
    assert (fake_scancel / "scancelled").read_text() == "1001\n"
    assert capsys.readouterr().err == (
        f"error: the chat server did not answer within 0s: cancelled job 1001, so that it does not hold a GPU with "
        f"nobody connected; its logs: {chat_logs(tmp_path)} (wait_s=SECONDS waits longer)\n")


@pytest.mark.parametrize("env, base", [({"NANOCHAT_SCRATCH": "scratch"}, "scratch/nanochat"),
                                       ({"NANOCHAT_SCRATCH": "scratch", "NANOCHAT_BASE_DIR": "base"}, "base"),
                                       ({}, "home/.cache/nanochat")])
def test_chat_slurm_keeps_its_token_where_nanochat_finds_the_runs(tmp_path, env, base):
    # the script's own lines that pick the folder, run in bash with the job's variables
    repo = Path(__file__).resolve().parent.parent
    script = (repo / "slurm" / "chat.slurm").read_text()
    subprocess.run(["bash", "-n", repo / "slurm" / "chat.slurm"], check=True)
    lines = "\n".join(re.findall(r"^(?:PY|BASE|TOKEN_FILE)=.*$", script, re.M))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "NANOCHAT_PYTHON": sys.executable,
           "SLURM_JOB_ID": "7", **{key: str(tmp_path / value) for key, value in env.items()}}
    out = subprocess.run(["bash", "-c", f"set -euo pipefail\n{lines}\necho $TOKEN_FILE"], cwd=repo, env=env,
                         check=True, capture_output=True, text=True).stdout
    assert out == f"{tmp_path / base}/chat/chat-7.token\n"
