"""Web chat on a compute node, reached from the login node through an SSH tunnel.

    python -m experiments.chat +cluster=h100 [RUN] [stage=sft] [idle_min=60]

Submits one 1-GPU job that serves `nanochat.chat_web` bound to the node's own address (not loopback: the login
node must reach it) with a fresh token, waits until the server answers, then prints the `ssh -L` line (and a
ProxyJump variant) and the URL with the token. The server exits after `idle_min` minutes without requests.
"""

import ipaddress
import json
import os
import secrets
import socket
import sys
import time
import urllib.request
from pathlib import Path

from nanochat.common import UserError, atomic_write_text
from nanochat.scheduler import SlurmJob, queue_hint


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


def serve_in_job(run: str | None, stage: str | None, connection_file: str, idle_min: float,
                 runs_root: str | None = None) -> int:
    """Runs on the compute node: pick an address, port and token, write them for the login side, serve.
    `runs_root`: the profile's, where the server looks a run name up (None: the node's default)."""
    from nanochat.chat_web import main as chat_web

    host = node_address(SlurmJob.from_env().submit_host or "localhost")
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    token = secrets.token_urlsafe(24)
    atomic_write_text(connection_file, json.dumps({"host": host, "port": port, "token": token,
                                                   "node": socket.gethostname()}))
    os.chmod(connection_file, 0o600)  # it holds the token
    args = ["--host", host, "--port", str(port), f"--token={token}", "--idle-timeout", str(idle_min)]
    args += (["--run", run] if run else []) + (["--stage", stage] if stage else [])
    args += ["--runs-root", runs_root] if runs_root else []
    return chat_web(args)


def wait_until_up(connection_file: Path, job, timeout_s: float) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if job.done():
            raise UserError(f"the chat job {job.job_id} ended before serving; see {job.paths.stdout}")
        if connection_file.is_file():
            info = json.loads(connection_file.read_text())
            try:
                urllib.request.urlopen(f"http://{info['host']}:{info['port']}/health", timeout=2)
                return info
            except OSError:
                pass
        time.sleep(1)
    raise UserError(f"the chat server did not answer within {timeout_s:.0f}s (job {job.job_id} may still be "
                    f"queued: {queue_hint(job.job_id)}); its log: {job.paths.stdout}")


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        from experiments.config import load_config
        from experiments.slurm import executor, job_env
        from nanochat.runs import resolve_runs_root

        runs = [a for a in args if "=" not in a]
        keys = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith(("+", "cluster.")))
        cfg = load_config([a for a in args if a.startswith(("+cluster", "cluster."))])
        if cfg.cluster is None:
            raise UserError("pass +cluster=NAME (on a laptop, run python -m nanochat.chat_web directly)")
        folder = resolve_runs_root(cluster_runs_root=cfg.cluster.runs_root) / "chat"
        folder.mkdir(parents=True, exist_ok=True)
        ex = executor(folder, cfg.cluster, gpu=True, env=job_env(cfg))
        ex.update_parameters(nodes=1, ntasks_per_node=1, gpus_per_node=min(1, cfg.cluster.gpus_per_node) or None,
                             job_name="nanochat-chat", time=int(keys.get("time_min", 240)))
        connection = folder / f"server-{secrets.token_hex(4)}.json"
        job = ex.submit(serve_in_job, runs[0] if runs else None, keys.get("stage"), str(connection),
                        float(keys.get("idle_min", 60)), cfg.cluster.runs_root)
        print(f"Submitted job {job.job_id}")
        print(f"  log: {job.paths.stdout}\n  waiting for the server ...", flush=True)
        info = wait_until_up(connection, job, float(keys.get("wait_s", 600)))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    login, user, port = socket.getfqdn(), os.environ.get("USER", "me"), info["port"]
    print(f"Chat server up on {info['node']} ({info['host']}:{port}). On your laptop:")
    print(f"  ssh -N -L {port}:{info['host']}:{port} {user}@{login}")
    print(f"  or: ssh -N -L {port}:{info['host']}:{port} -J {user}@{login} {user}@{info['node']}")
    print(f"  then open http://localhost:{port}/?token={info['token']}")
    print(f"  stop it: scancel {job.job_id} (it also exits after {keys.get('idle_min', 60)} idle minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
