"""nanochat.hub and nanochat.registry: pinned, checked downloads through huggingface_hub, against a local server
that answers as the hub does (HF_ENDPOINT points at it); offline and gated failures as one line."""

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest

from nanochat import registry
from nanochat.common import UserError
from nanochat.download import DownloadError, NoNetworkError, download_many
from nanochat.hub import HubJob
from test_download import closed_port_url  # tests/ is on sys.path under pytest

PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
PINNED, NEWER = "1" * 40, "2" * 40
FAST = dict(retries=1, backoff_s=0.01, timeout_s=5, log=lambda _: None)


class FakeHub:
    """Answers hf_hub_download as the hub does: HEAD and GET on /datasets/<repo>/resolve/<revision>/<path>, the
    commit in X-Repo-Commit, an LFS file's sha256 and size in X-Linked-Etag and X-Linked-Size, errors named in
    X-Error-Code. `corrupt` paths get a byte flipped in the GET body (the headers keep the true sha256); a repo in
    `tokens` answers only requests that carry `Authorization: Bearer <its token>`, as a gated repo does."""

    def __init__(self):
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, commit) -> {path: bytes}
        self.branches: dict[tuple[str, str], str] = {}  # (repo, branch) -> commit
        self.corrupt: set[str] = set()
        self.tokens: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of the requests for files
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", unquote(self.path))
                if not m:  # e.g. huggingface_hub's telemetry (/api/agent-harnesses)
                    return self.fail(404, "RepoNotFound")
                with hub.lock:
                    hub.requests.append((self.command, self.path))
                repo, revision, path = m.groups()
                token = hub.tokens.get(repo)
                if token and self.headers.get("Authorization") != f"Bearer {token}":
                    return self.fail(403, "GatedRepo")
                commit = hub.branches.get((repo, revision), revision)
                if (repo, commit) not in hub.files:
                    return self.fail(404, "RevisionNotFound")
                data = hub.files[(repo, commit)].get(path)
                if data is None:
                    return self.fail(404, "EntryNotFound", commit)
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(bytes([data[0] ^ 1]) + data[1:] if path in hub.corrupt else data)

            def fail(self, status: int, code: str, commit: str | None = None):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, repo: registry.HubRepo, files: dict[str, bytes], branch: str | None = None) -> None:
        self.files.setdefault((repo.repo_id, repo.revision), {}).update(files)
        if branch:
            self.branches[(repo.repo_id, branch)] = repo.revision

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    for var in (*PROXIES, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    srv = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    yield srv
    srv.close()


def test_a_repo_without_a_pin_stays_on_the_commit_its_first_file_came_from(hub, tmp_path):
    """No registry pin (registry.NOT_YET_PINNED): the first file records the branch's commit beside the files, and
    once the branch moves a later file of that folder is refused in one line, not fetched from the newer commit."""
    repo = registry.HubRepo("someone/unpinned", registry.NOT_YET_PINNED)
    first = replace(repo, revision=PINNED)
    hub.add(first, {"a.parquet": b"first commit a", "b.parquet": b"first commit b"}, branch="main")
    out = tmp_path / "out"
    download_many([HubJob(repo, "a.parquet", out / "a.parquet")], log=lambda _: None)
    assert (out / ".hub-commit").read_text() == PINNED + "\n" and (out / "a.parquet").read_bytes() == b"first commit a"
    hub.add(replace(repo, revision=NEWER), {"b.parquet": b"newer b"}, branch="main")  # the branch moves on
    with pytest.raises(DownloadError) as refused:
        download_many([HubJob(repo, "b.parquet", out / "b.parquet")], **FAST)
    assert f"not the pinned {PINNED}" in str(refused.value) and "\n" not in str(refused.value)
    assert not (out / "b.parquet").exists()


def test_a_file_comes_from_the_pinned_commit_not_the_branch(hub, tmp_path):
    repo = registry.HubRepo("someone/data", PINNED)
    hub.add(repo, {"d/a.parquet": b"pinned bytes"})
    hub.add(replace(repo, revision=NEWER), {"d/a.parquet": b"newer bytes on main"}, branch="main")
    dest = tmp_path / "out" / "a.parquet"
    [path] = download_many([HubJob(repo, "d/a.parquet", dest)], log=lambda _: None)
    assert path == dest and dest.read_bytes() == b"pinned bytes"
    assert hub.requests and all(p == f"/datasets/someone/data/resolve/{PINNED}/d/a.parquet" for _, p in hub.requests)
    assert os.listdir(dest.parent) == ["a.parquet"]  # the private download folder is gone
    n = len(hub.requests)
    download_many([HubJob(repo, "d/a.parquet", dest)], log=lambda _: None)
    assert len(hub.requests) == n  # staged: not asked again


def test_bytes_that_differ_from_the_hubs_sha256_are_refused(hub, tmp_path):
    repo = registry.HubRepo("someone/data", PINNED)
    hub.add(repo, {"a.parquet": b"the real bytes"})
    hub.corrupt.add("a.parquet")
    dest = tmp_path / "out" / "a.parquet"
    with pytest.raises(DownloadError, match=r"sha256 mismatch.*\(after 2 attempts\)") as err:
        HubJob(repo, "a.parquet", dest).fetch(**FAST)
    assert "\n" not in str(err.value) and PINNED in str(err.value)
    assert os.listdir(dest.parent) == []  # neither the file nor a leftover


def test_a_missing_file_or_revision_is_one_line_and_not_retried(hub, tmp_path):
    repo = registry.HubRepo("someone/data", PINNED)
    hub.add(repo, {"a.parquet": b"x"})
    with pytest.raises(DownloadError, match="no such file in someone/data@111111111111 .not retried"):
        HubJob(repo, "b.parquet", tmp_path / "b.parquet").fetch(**FAST)
    with pytest.raises(DownloadError, match=f"no revision {NEWER} in someone/data .not retried"):
        HubJob(replace(repo, revision=NEWER), "a.parquet", tmp_path / "a.parquet").fetch(**FAST)
    assert len(hub.requests) == 2


def test_a_gated_repo_asks_for_hf_token_and_downloads_with_it(hub, tmp_path, monkeypatch):
    repo = registry.HubRepo("someone/gated", PINNED)
    hub.add(repo, {"a.parquet": b"behind the gate"})
    hub.tokens["someone/gated"] = "hf_secret"
    job = HubJob(repo, "a.parquet", tmp_path / "a.parquet")
    with pytest.raises(UserError, match="someone/gated@111111111111 is gated: .* set HF_TOKEN"):
        job.fetch(**FAST)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert job.fetch(**FAST).read_bytes() == b"behind the gate"


def test_an_unreachable_endpoint_is_no_network_at_once(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url().rsplit("/", 1)[0])
    t0 = time.monotonic()
    with pytest.raises(NoNetworkError, match=r"cannot reach 127\.0\.0\.1:\d+ .*offline.*with: stage-it --now$"):
        HubJob(registry.CLIMBMIX, "shard_00000.parquet", tmp_path / "s.parquet").fetch(
            retries=5, backoff_s=1.0, hint="stage-it --now")
    assert time.monotonic() - t0 < 5  # no backoff rounds


def _cli(args, tmp_path, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in PROXIES and k not in ("HF_ENDPOINT", "HF_TOKEN")}
    env.update(NANOCHAT_BASE_DIR=str(tmp_path / "base"), HF_HOME=str(tmp_path / "hf"), **env_vars)
    return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, command", [
    (["nanochat.dataset", "-n", "2"], "python -m nanochat.dataset --dataset climbmix -n 2"),
    (["tasks.stage", "--tasks", "humaneval"], "python -m tasks.stage"),
])
def test_offline_mode_is_one_line_naming_the_staging_command(tmp_path, args, command):
    proc = _cli(args, tmp_path, HF_HUB_OFFLINE="1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: HF_HUB_OFFLINE is set and ") and line.endswith(f"login node with: {command}")


def test_dataset_cli_on_a_node_without_network_is_one_line(tmp_path):
    proc = _cli(["nanochat.dataset", "-n", "2"], tmp_path, HF_ENDPOINT=closed_port_url().rsplit("/", 1)[0])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach 127.0.0.1:") and "offline" in line
    assert line.endswith("python -m nanochat.dataset --dataset climbmix -n 2")


def test_stage_climbmix_from_the_hub_at_its_pinned_commit(hub, tmp_path):
    from nanochat import dataset

    shards = {dataset.shard_name(i): f"shard {i}".encode() for i in (0, 1, 6542)}
    hub.add(registry.CLIMBMIX, shards)
    files = dataset.stage("climbmix", 2, with_assets=False, log=lambda _: None)
    assert [f.name for f in files] == list(shards) and [f.read_bytes() for f in files] == list(shards.values())
    assert {p.split("/resolve/")[1].split("/")[0] for _, p in hub.requests} == {registry.CLIMBMIX.revision}


# ---------------------------------------------------------------------------------------------------------
# The registry


def test_every_hub_repo_is_pinned_to_a_commit_but_the_named_placeholders():
    unpinned = {r.repo_id for r in registry.HUB_REPOS if not r.pinned}
    assert unpinned == {"karpathy/fineweb-edu-100b-shuffle"}  # registry.NOT_YET_PINNED: look its commit up
    assert all(r.revision == registry.NOT_YET_PINNED for r in registry.HUB_REPOS if not r.pinned)


def test_every_remote_file_is_read_from_the_registry():
    from nanochat.dataset import DATASETS
    from tasks.hub import DATA

    repos = {d.repo for d in DATASETS.values() if d.repo} | {d.repo for d in DATA.values()}
    assert repos == set(registry.HUB_REPOS)
    for asset in [*registry.ASSETS, *registry.ARCHIVES, registry.WORD_LIST]:
        assert re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{40}", asset.checksum), asset.name
    assert len(registry.EVAL_BUNDLE.checksum) == 64  # no revisions where it is hosted: its sha256 is the pin
    assert "/master/" not in registry.WORD_LIST.url and "/main/" not in registry.WORD_LIST.url
