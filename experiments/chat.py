"""Web chat on a compute node, reached from the login node through an SSH tunnel.

    python -m experiments.chat +cluster=h100 [RUN] [stage=sft] [idle_min=60] [wait_s=600] [time_min=240]

Writes a fresh token to a file only you can read (mode 0600) in the chat folder, submits one 1-GPU job that serves
`nanochat.chat_web` bound to the node's own address (not loopback: the login node must reach it) with that token
file, waits until the server answers, then prints the `ssh -L` line (and a ProxyJump variant) and the URL with the
token, here only: the token is on no command line and in no log. `cluster.login_host` (and `cluster.jump_host`,
a bastion) name the login node as your laptop reaches it. The job is never requeued (it has nothing to resume); a
server that did not answer within `wait_s`, or whose wait you interrupt (Ctrl-C), is cancelled, so that it does not
start later and hold a GPU with nobody connected; a running one exits after `idle_min` minutes without requests.
"""

import ipaddress
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import submitit

from nanochat.chat_auth import token_from_file
from nanochat.common import UserError, atomic_write_text
from nanochat.scheduler import SlurmJob

from experiments.slurm import executor, job_env, log_files


def node_address(toward: str) -> str:
    """This node's address on the interface that routes to `toward` (the login node): a UDP 'connect' picks
    the route without sending anything. socket.gethostbyname(hostname) is often 127.0.1.1 on Debian.

    Where `toward` resolves to loopback here (the node's /etc/hosts maps the login node's name to 127.0.x.x,
    or a one-machine cluster) or not at all, the route says nothing: then the address of the route to the
    node's own name (as the scheduler names it, else the hostname), if that is not loopback. Loopback is the
    last resort."""
    def source(name: str | None) -> str | None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((socket.gethostbyname(name), 9))
                return probe.getsockname()[0]
        except (OSError, TypeError, UnicodeError):
            return None

    fallback = None
    for name in (toward, SlurmJob.from_env().node_name, socket.gethostname()):
        address = source(name)
        if address and not ipaddress.ip_address(address).is_loopback:
            return address
        fallback = fallback or address
    if fallback is None:
        raise UserError(f"no address of this node ({socket.gethostname()}) routes to {toward}")
    return fallback


def serve_in_job(run: str | None, stage: str | None, connection_file: str, token_file: str, idle_min: float,
                 runs_root: str | None = None) -> int:
    """Runs on the compute node: pick an address and port, write them for the login side, serve with the token in
    `token_file`. `runs_root`: the profile's, where the server looks a run name up (None: the node's default)."""
    from nanochat.chat_web import main as chat_web

    host = node_address(SlurmJob.from_env().submit_host or "localhost")
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    atomic_write_text(connection_file, json.dumps({"host": host, "port": port, "node": socket.gethostname()}))
    args = ["--host", host, "--port", str(port), "--token-file", token_file, "--idle-timeout", str(idle_min)]
    args += (["--run", run] if run else []) + (["--stage", stage] if stage else [])
    args += ["--runs-root", runs_root] if runs_root else []
    return chat_web(args)


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ChatExecutor(submitit.SlurmExecutor):
    """submitit's executor without the `#SBATCH --signal=USR2@...` it always writes: USR2 before the time limit asks a
    training job to save and requeue itself, and the chat server has nothing to save and must not come back."""

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return re.sub(r"^#SBATCH --signal=.*\n", "", super()._make_submission_file_text(command, uid), flags=re.M)


def chat_executor(folder: Path, cfg, time_min: int) -> ChatExecutor:
    """One task on one node with one GPU (none where the profile has none), `--no-requeue`, and none of the
    training jobs' batch-step hooks (they requeue on the ranks' exit codes)."""
    cluster = cfg.cluster
    ex = executor(folder, cluster, gpu=True, env=job_env(cfg), service=ChatExecutor)
    ex.update_parameters(nodes=1, ntasks_per_node=1, gpus_per_node=min(1, cluster.gpus_per_node) or None,
                         time=time_min, job_name="nanochat-chat")
    return ex


def server_address(connection_file: Path, job) -> dict | None:
    """The server's address once it answers, else None; a UserError once the job ended without serving."""
    if job.done():
        raise UserError(f"the chat job {job.job_id} ended before serving; see {job_logs(job)}")
    if connection_file.is_file():
        info = json.loads(connection_file.read_text())
        try:
            # straight to the node: a login node's http_proxy cannot reach it
            NO_PROXY.open(f"http://{info['host']}:{info['port']}/health", timeout=2)
            return info
        except OSError:
            pass
    return None


def wait_until_up(connection_file: Path, job, timeout_s: float) -> dict:
    """The server's address once it answers; past `timeout_s` the job is cancelled (UserError)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        info = server_address(connection_file, job)
        if info:
            return info
        time.sleep(1)
    raise UserError(f"the chat server did not answer within {timeout_s:.0f}s: {cancel_unserved(job)} "
                    f"(wait_s=SECONDS waits longer)")


def cancel_unserved(job) -> str:
    """Cancel a chat job that is not serving yet, so that it does not start later and hold a GPU with nobody
    connected; what happened, for the user's one line."""
    try:
        job.cancel()
    except subprocess.CalledProcessError:
        return f"scancel {job.job_id} failed: cancel it yourself; its logs: {job_logs(job)}"
    return (f"cancelled job {job.job_id}, so that it does not hold a GPU with nobody connected; its logs: "
            f"{job_logs(job)}")


def job_logs(job) -> str:
    """The `log:` lines' words for the chat job's files (.err first)."""
    return log_files(job.paths.stderr, job.paths.stdout)


def ssh_lines(cluster, user: str, node: str, host: str, port: int) -> list[str]:
    """How to reach host:port from a laptop: a tunnel through the login node, and one that jumps on to the node."""
    def at(name: str) -> str:
        return name if "@" in name else f"{user}@{name}"

    login = cluster.login_host or socket.getfqdn()
    forward = f"ssh -N -L {port}:{host}:{port}"
    jumps = [at(cluster.jump_host)] if cluster.jump_host else []
    lines = [f"  {forward} {'-J ' + jumps[0] + ' ' if jumps else ''}{at(login)}",
             f"  or: {forward} -J {','.join([*jumps, at(login)])} {at(node)}"]
    if not cluster.login_host:
        lines.append(f"  ({login} is the name the login node gives itself; where your laptop knows it by another, "
                     f"set cluster.login_host=NAME in the profile, and cluster.jump_host=NAME for a bastion in front)")
    return lines


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        from experiments.config import load_config
        from nanochat.runs import resolve_runs_root

        runs = [a for a in args if "=" not in a]
        keys = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith(("+", "cluster.")))
        cfg = load_config([a for a in args if a.startswith(("+cluster", "cluster."))])
        if cfg.cluster is None:
            raise UserError("pass +cluster=NAME (on a laptop, run python -m nanochat.chat_web directly)")
        folder = resolve_runs_root(cluster_runs_root=cfg.cluster.runs_root) / "chat"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"server-{secrets.token_hex(4)}"
        token_file = folder / f"{name}.token"
        token = token_from_file(token_file)
        ex = chat_executor(folder, cfg, int(keys.get("time_min", 240)))
        job = ex.submit(serve_in_job, runs[0] if runs else None, keys.get("stage"), str(folder / f"{name}.json"),
                        str(token_file), float(keys.get("idle_min", 60)), cfg.cluster.runs_root)
        print(f"Submitted job {job.job_id}")
        print(f"  log: {job_logs(job)}\n  waiting for the server ...", flush=True)
        try:
            info = wait_until_up(folder / f"{name}.json", job, float(keys.get("wait_s", 600)))
        except KeyboardInterrupt:  # nobody will connect to it
            print(f"error: interrupted while waiting for the chat server: {cancel_unserved(job)}", file=sys.stderr)
            return 130
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    user, port = os.environ.get("USER", "me"), info["port"]
    print(f"Chat server up on {info['node']} ({info['host']}:{port}). On your laptop:")
    print("\n".join(ssh_lines(cfg.cluster, user, info["node"], info["host"], port)))
    print(f"  then open http://localhost:{port}/?token={token}")
    print(f"  the token (also the OpenAI api_key) is in {token_file}, readable by you only")
    print(f"  stop it: scancel {job.job_id} (it also exits after {keys.get('idle_min', 60)} idle minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
