"""The web chat on the local Slurm cluster: `python -m experiments.chat` and `sbatch slurm/chat.slurm` serve on the
node's own address with a token and print the tunnel lines and the URL; the server is reached from this machine
(the login node) through the address printed, as the ssh -L line would reach it.

slurm/dev/up.sh puts each node in a network namespace of its own, so a job's 127.0.0.1 is the node's loopback,
not this machine's: a server bound to loopback by mistake is unreachable from here, as on a real cluster
(test_a_loopback_bound_server_is_not_reachable_from_the_login_node proves the cluster catches that). Where
up.sh could not create namespaces, the nodes share this machine's loopback and that check is skipped.
"""

import http.cookiejar
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from slurm_fixtures import REPO, describe, is_loopback, job_field, sbatch, sh, slurm_cluster, wait_for  # noqa: F401
from test_chat_cli import run_folder  # noqa: F401 (fixture)

pytestmark = pytest.mark.slurm

NOT_ISOLATED = ("the dev cluster's nodes share this machine's loopback (NodeAddr 127.0.0.1: slurm/dev/up.sh could "
                "not create network namespaces, e.g. no CAP_NET_ADMIN), so a server bound to 127.0.0.1 in a job "
                "cannot be told from one on the node's address")


def job_node(job: int) -> str:
    def node():
        nodes = job_field(job, "NodeList")
        return nodes if nodes and nodes != "(null)" else None
    return wait_for(node, 30, f"job {job}'s node")


def check_address(cluster: dict, job: int, host: str) -> None:
    """The address printed is the address of the node the job runs on (its NodeAddr), never loopback where
    the nodes have addresses of their own."""
    node = job_node(job)
    assert host == cluster["addresses"][node], (host, node, cluster["addresses"])
    if cluster["isolated"]:
        assert not is_loopback(host)


def check_server(host: str, port: str, token: str) -> None:
    """From this machine: the token is required, and with it the OpenAI API answers."""
    with pytest.raises(urllib.error.HTTPError) as denied:  # the token is required, whatever the address
        urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=10)
    assert denied.value.code == 401
    import openai
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=token, timeout=60)
    model = client.models.list().data[0].id  # the served model's id: any other name is a 404, as OpenAI's
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")


def check_from_node(job: int, host: str, port: str) -> None:
    """The ProxyJump variant's forward target (host:port) as the node resolves and reaches it: an extra step
    in the job, on its node."""
    probe = f"import urllib.request; urllib.request.urlopen('http://{host}:{port}/health', timeout=10)"
    sh("srun", f"--jobid={job}", "--overlap", "-N1", "-n1", sys.executable, "-c", probe, timeout=60)


def chat(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """python -m experiments.chat on the local cluster, its chat folder under tmp_path."""
    return subprocess.run([sys.executable, "-m", "experiments.chat", "+cluster=localslurm", *args], capture_output=True,
                          text=True, timeout=200, env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)})


def check_token_kept(token: str, token_file: Path, logs: list[Path]) -> None:
    """The token is in its file, readable by its owner only, and nowhere else: on no process's command line (the
    nodes of the dev cluster share this machine's processes, so the chat job's are among them) and in none of
    `logs` (the job's output and whatever else it and its submission wrote)."""
    assert token_file.read_text().strip() == token
    assert token_file.stat().st_mode & 0o777 == 0o600
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert token.encode() not in cmdline.read_bytes(), f"the token is on the command line of {cmdline}"
        except OSError:  # the process ended meanwhile
            pass
    assert logs and all(token not in log.read_text(errors="replace") for log in logs), logs


def check_url(url: str, host: str) -> None:
    """The URL printed, through the tunnel: the page sets the token's cookie, redirects, and serves the chat page."""
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with browser.open(url.replace("//localhost:", f"//{host}:"), timeout=30) as page:
        assert page.status == 200 and "token=" not in page.url and b"nanochat" in page.read()


def check_never_requeued(job: int) -> None:
    """The batch script Slurm holds asks for no requeue and no signal before the time limit."""
    script = sh("scontrol", "write", "batch_script", str(job), "-")
    assert "#SBATCH --no-requeue" in script and "--requeue" not in script.replace("--no-requeue", ""), script
    assert "--signal" not in script, script
    assert job_field(job, "Requeue") == "0"


def test_chat_job_prints_a_working_tunnel_line(slurm_cluster, run_folder, tmp_path):  # noqa: F811
    result = chat(tmp_path, "tiny-d2", "idle_min=2", "wait_s=120", "cluster.login_host=login.example.org",
                  "cluster.jump_host=gw.example.org")
    assert result.returncode == 0, result.stderr
    job = int(re.search(r"Submitted job (\d+)", result.stdout).group(1))
    try:
        port, host = re.search(r"ssh -N -L (\d+):([\d.]+):\1 -J \S+@gw\.example\.org \S+@login\.example\.org\n",
                               result.stdout).groups()
        jump = re.search(r"ssh -N -L (\d+):([\d.]+):\1 -J \S+@gw\.example\.org,\S+@login\.example\.org \S+@\S+\n",
                         result.stdout)  # ProxyJump variant
        assert jump and jump.groups() == (port, host), result.stdout
        url = re.search(r"then open (http://localhost:\d+/\?token=(\S+))\n", result.stdout)
        token_file = Path(re.search(r"is in (\S+), readable by you only", result.stdout).group(1))
        written = [f for f in token_file.parent.iterdir() if f.is_file() and f != token_file]  # logs, pickles, ...
        check_token_kept(url.group(2), token_file, written)
        check_never_requeued(job)
        check_address(slurm_cluster, job, host)
        check_url(url.group(1), host)
        check_server(host, port, url.group(2))
        check_from_node(job, host, port)
    finally:
        sh("scancel", str(job), check=False)


def test_a_chat_job_that_does_not_answer_in_time_is_cancelled(slurm_cluster, run_folder, tmp_path):  # noqa: F811
    # 1 s: the job cannot answer so soon (its Python alone takes longer to import torch and load the model)
    result = chat(tmp_path, "tiny-d2", "wait_s=1")
    job = int(re.search(r"Submitted job (\d+)", result.stdout).group(1))
    try:
        assert result.returncode == 2 and re.fullmatch(
            rf"error: the chat server did not answer within 1s: cancelled job {job}, .*\n", result.stderr), result
        # cancelled at once; a job that had started leaves squeue once its processes are gone (COMPLETING first)
        wait_for(lambda: sh("squeue", "-h", "-j", str(job), "-t", "PD,CF,R,CG", check=False) == "", 30,
                 f"job {job} to leave squeue")
        assert job_field(job, "JobState") in (None, "CANCELLED")
    finally:
        sh("scancel", str(job), check=False)


def test_sbatch_chat_slurm_serves_on_the_node_address(slurm_cluster, run_folder, tmp_path):  # noqa: F811
    # The script asks for a GPU and 8 CPUs; the dev cluster has neither: the command line overrides #SBATCH.
    out = tmp_path / "slurm-chat-%j.out"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "NANOCHAT_PYTHON": sys.executable, "IDLE_MIN": "2"}
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}",
                           "slurm/chat.slurm", "--run", "tiny-d2", "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job = int(proc.stdout.strip().split(";")[0])
    log = tmp_path / f"slurm-chat-{job}.out"

    def served():
        text = log.read_text() if log.is_file() else ""
        if re.search(r"^nanochat chat_web: .* open http://", text, re.MULTILINE):  # the server's own line
            return text
        if job_field(job, "JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING"):
            raise AssertionError(f"chat job {job} ended before serving:\n{text}\n{describe(job)}")
        return None

    try:
        text = wait_for(served, 150, f"the chat server of job {job} to start")
        port, host, login = re.search(r"ssh -N -L (\d+):([\d.]+):\1 (\S+@\S+)\n", text).groups()
        jump = re.search(r"ssh -N -L (\d+):([\d.]+):\1 -J (\S+@\S+) \S+@\S+\n", text)  # ProxyJump variant
        assert jump and jump.groups() == (port, host, login), text
        token_file = Path(re.search(r"TOKEN \(also the OpenAI api_key\) is in (\S+), readable by you only", text)[1])
        assert re.search(rf"^nanochat chat_web: .* open http://{re.escape(host)}:{port}/\?token=<the token in "
                         rf"{re.escape(str(token_file))}>$", text, re.MULTILINE), text
        token = token_file.read_text().strip()
        check_token_kept(token, token_file, [log])
        check_never_requeued(job)
        check_address(slurm_cluster, job, host)
        check_url(f"http://localhost:{port}/?token={token}", host)
        check_server(host, port, token)
        check_from_node(job, host, port)
    finally:
        sh("scancel", str(job), check=False)


# Runs in a job: the mistake (a server on 127.0.0.1) and the right way (one on the node's address), each
# answering every connection with its own nonce; checks the mistake answers on the node itself, then writes
# what it serves for the test, and waits to be cancelled.
TWO_SERVERS = textwrap.dedent('''
    import json, os, secrets, socket, sys, threading, time
    from experiments.chat import node_address

    def serve(sock, nonce):
        while True:
            conn, _ = sock.accept()
            conn.sendall(nonce.encode())
            conn.close()

    address = node_address(os.environ["SLURM_SUBMIT_HOST"])
    mistake, right = socket.create_server(("127.0.0.1", 0)), socket.create_server((address, 0))
    info = {"address": address, "loopback_port": mistake.getsockname()[1], "node_port": right.getsockname()[1],
            "loopback_nonce": secrets.token_hex(8), "node_nonce": secrets.token_hex(8)}
    threading.Thread(target=serve, args=(mistake, info["loopback_nonce"]), daemon=True).start()
    threading.Thread(target=serve, args=(right, info["node_nonce"]), daemon=True).start()
    with socket.create_connection(("127.0.0.1", info["loopback_port"]), timeout=10) as conn:
        assert conn.recv(64).decode() == info["loopback_nonce"], "the loopback server does not answer on its node"
    with open(sys.argv[1] + ".tmp", "w") as f:
        json.dump(info, f)
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(600)
''')


def answer(host: str, port: int) -> str | None:
    """What a server at host:port sends on connecting; None if nothing listens there (refused, unreachable)."""
    try:
        with socket.create_connection((host, port), timeout=5) as conn:
            conn.settimeout(5)
            return conn.recv(64).decode(errors="replace")
    except OSError:
        return None


def test_a_loopback_bound_server_is_not_reachable_from_the_login_node(slurm_cluster, tmp_path):
    if not slurm_cluster["isolated"]:
        pytest.skip(NOT_ISOLATED)
    script, info_file = tmp_path / "two_servers.py", tmp_path / "servers.json"
    script.write_text(TWO_SERVERS)
    job = sbatch(f"#!/bin/bash\nexec {sys.executable} {script} {info_file}\n", "-N1", "-n1", "-t", "10",
                 f"--output={tmp_path}/job-%j.out", cwd=REPO)
    try:
        def written():
            if info_file.is_file():
                return json.loads(info_file.read_text())
            if job_field(job, "JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING"):
                log = tmp_path / f"job-{job}.out"
                raise AssertionError(f"job {job} ended early:\n{log.read_text() if log.is_file() else ''}")
            return None

        info = wait_for(written, 90, f"job {job}'s servers")
        check_address(slurm_cluster, job, info["address"])
        # The node is reachable from here: the server on its address answers, so the refusals below are the
        # namespaces at work, not a node that cannot be reached at all.
        assert answer(info["address"], info["node_port"]) == info["node_nonce"]
        # The server bound to the node's 127.0.0.1 (answering there, as the job checked) is reachable neither
        # at the node's address nor at this machine's 127.0.0.1 with the same port.
        for host in (info["address"], "127.0.0.1"):
            assert answer(host, info["loopback_port"]) != info["loopback_nonce"], \
                f"a server bound to 127.0.0.1 in job {job} is reachable from the login node at {host}"
    finally:
        sh("scancel", str(job), check=False)
