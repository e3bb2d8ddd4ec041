"""nanochat.download against a misbehaving local HTTP server (127.0.0.1 only): resume, retry, fail fast."""

import hashlib
import io
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nanochat.download import DownloadError, DownloadJob, NoNetworkError, _Transfer, download_file, download_many
from nanochat.progress import Progress


class FileServer:
    """Serves `files` (URL path -> bytes) with Range support; `modes` (URL path -> mode) make it misbehave:

    ok            plain file server (206 for a Range request)
    norange       ignores Range: always 200 with the whole body
    drop:N        the first N requests send half of the body, then hang up
    stall:N       the first N requests send half of the body, then go silent (a read timeout)
    truncate      every request sends half of what it announces
    503:N         the first N requests get 503, then it behaves
    404           always 404
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                with server.lock:
                    server.requests.append((self.path, self.headers.get("Range")))
                    nth = sum(1 for p, _ in server.requests if p == self.path)
                mode, _, arg = server.modes.get(self.path, "ok").partition(":")
                if self.path not in server.files or mode == "404":
                    return self.send_error(404)
                if mode == "503" and nth <= int(arg):
                    return self.send_error(503)
                body, start = server.files[self.path], 0
                rng = self.headers.get("Range")
                if rng and mode != "norange":
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                rest = body[start:]
                self.send_header("Content-Length", str(len(rest)))
                self.end_headers()
                broken = mode == "truncate" or (mode in ("drop", "stall") and nth <= int(arg))
                self.wfile.write(rest[: len(rest) // 2] if broken else rest)
                self.wfile.flush()
                if broken and mode == "stall":
                    time.sleep(0.6)  # longer than the client's timeout_s in the test
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, data: bytes, mode: str = "ok") -> str:
        self.files[path], self.modes[path] = data, mode
        return self.url + path

    def hits(self, path: str) -> list[str | None]:
        """The Range header of each request for `path`, in order."""
        with self.lock:
            return [r for p, r in self.requests if p == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # a CI proxy must not see 127.0.0.1 requests
    srv = FileServer()
    yield srv
    srv.close()


def closed_port_url() -> str:
    """A URL on which nothing listens: connecting is refused at once."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/file.bin"


BODY = os.urandom(200_000)
FAST = dict(backoff_s=0.01, timeout_s=5)


def test_plain_download_is_atomic_and_checked(server, tmp_path):
    url = server.add("/a.bin", BODY)
    dest = download_file(url, tmp_path / "a.bin", checksum=hashlib.sha256(BODY).hexdigest(), **FAST)
    assert dest.read_bytes() == BODY
    assert not (tmp_path / "a.bin.part").exists()
    download_file(url, dest, **FAST)  # present: skipped without a request
    assert server.hits("/a.bin") == [None]


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    url = server.add("/a.bin", BODY, "drop:2")
    dest = download_file(url, tmp_path / "a.bin", **FAST)
    assert dest.read_bytes() == BODY
    ranges = server.hits("/a.bin")
    assert len(ranges) == 3 and ranges[0] is None
    assert ranges[1] == f"bytes={len(BODY) // 2}-"  # resumed where the first body broke off, not from 0
    assert ranges[2] is not None


def test_read_timeout_mid_body_is_retried(server, tmp_path):
    url = server.add("/a.bin", BODY, "stall:1")
    dest = download_file(url, tmp_path / "a.bin", backoff_s=0.01, timeout_s=0.3)
    assert dest.read_bytes() == BODY
    assert server.hits("/a.bin")[1] == f"bytes={len(BODY) // 2}-"


def test_part_from_an_earlier_run_is_resumed(server, tmp_path):
    url = server.add("/a.bin", BODY)
    (tmp_path / "a.bin.part").write_bytes(BODY[:1234])
    assert download_file(url, tmp_path / "a.bin", **FAST).read_bytes() == BODY
    assert server.hits("/a.bin") == ["bytes=1234-"]


def test_complete_part_from_a_killed_run_is_kept(server, tmp_path):
    url = server.add("/a.bin", BODY)
    (tmp_path / "a.bin.part").write_bytes(BODY)  # killed between the last byte and the rename: 416
    assert download_file(url, tmp_path / "a.bin", **FAST).read_bytes() == BODY
    assert server.hits("/a.bin") == [f"bytes={len(BODY)}-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    url = server.add("/a.bin", BODY, "norange")
    (tmp_path / "a.bin.part").write_bytes(b"stale bytes from somewhere else")
    assert download_file(url, tmp_path / "a.bin", **FAST).read_bytes() == BODY  # not appended to the stale


def test_always_truncated_body_fails_without_leaving_dest(server, tmp_path):
    url = server.add("/a.bin", BODY, "truncate")
    with pytest.raises(DownloadError, match=r"truncated body.*after 4 attempts"):
        download_file(url, tmp_path / "a.bin", retries=3, **FAST)
    assert not (tmp_path / "a.bin").exists()
    ranges = server.hits("/a.bin")
    assert len(ranges) == 4 and all(r and r.startswith("bytes=") for r in ranges[1:])
    assert 0 < (tmp_path / "a.bin.part").stat().st_size < len(BODY)  # kept for a later resume


def test_503_twice_then_success(server, tmp_path):
    url = server.add("/a.bin", BODY, "503:2")
    assert download_file(url, tmp_path / "a.bin", **FAST).read_bytes() == BODY
    assert len(server.hits("/a.bin")) == 3


def test_404_fails_at_once(server, tmp_path):
    url = server.add("/a.bin", BODY, "404")
    with pytest.raises(DownloadError, match=r"HTTP 404.*not retried") as err:
        download_file(url, tmp_path / "a.bin", **FAST)
    assert url in str(err.value) and "\n" not in str(err.value)
    assert len(server.hits("/a.bin")) == 1
    assert list(tmp_path.iterdir()) == []


def test_refused_connection_is_no_network_at_once(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(NoNetworkError) as err:
        download_file(closed_port_url(), tmp_path / "a.bin", retries=5, backoff_s=1.0, hint="stage-it --now")
    assert time.monotonic() - t0 < 1.0  # no backoff: 5 retries at 1 s would take > 30 s
    msg = str(err.value)
    assert "cannot reach 127.0.0.1:" in msg and "offline" in msg and msg.endswith("stage-it --now")


def test_sha256_mismatch_is_rejected_and_deleted(server, tmp_path):
    url = server.add("/a.bin", BODY)
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download_file(url, tmp_path / "a.bin", checksum="0" * 64, retries=2, **FAST)
    assert len(server.hits("/a.bin")) == 3  # a bad body is deleted, so every attempt starts from byte 0
    assert server.hits("/a.bin") == [None, None, None]
    assert list(tmp_path.iterdir()) == []


def test_a_git_blob_id_is_a_checksum_too(server, tmp_path):
    """What git (and the hub, for a file outside LFS) publishes: sha1 of "blob <size>\\0" + bytes, 40 digits."""
    url = server.add("/a.bin", BODY)
    blob_id = hashlib.sha1(b"blob %d\0" % len(BODY) + BODY).hexdigest()
    assert download_file(url, tmp_path / "a.bin", checksum=blob_id, **FAST).read_bytes() == BODY
    with pytest.raises(DownloadError, match="git blob id mismatch"):
        download_file(url, tmp_path / "b.bin", checksum=hashlib.sha1(BODY).hexdigest(), retries=0, **FAST)
    assert not (tmp_path / "b.bin").exists()


def test_validator_failure_counts_as_failed_attempt(server, tmp_path):
    url = server.add("/a.bin", BODY)

    def picky(path):
        raise ValueError("footer missing")

    with pytest.raises(DownloadError, match="invalid file.*footer missing"):
        download_file(url, tmp_path / "a.bin", validate=picky, retries=1, **FAST)
    assert len(server.hits("/a.bin")) == 2
    assert list(tmp_path.iterdir()) == []


def test_download_many_returns_in_order_and_reports_progress(server, tmp_path):
    jobs = [DownloadJob(server.add(f"/f{i}.bin", BODY[i:]), tmp_path / f"f{i}.bin") for i in range(5)]
    (tmp_path / "f3.bin").write_bytes(BODY[3:])  # present: skipped, no progress line
    lines = []
    paths = download_many(jobs, workers=3, log=lines.append, **FAST)
    assert paths == [j.dest for j in jobs]
    assert [p.read_bytes() for p in paths] == [BODY[i:] for i in range(5)]
    assert len(lines) == 4 and all(line.startswith("[") and " MB in " in line for line in lines)
    assert server.hits("/f3.bin") == []


def test_download_many_stops_early_when_offline(server, tmp_path):
    jobs = [DownloadJob(closed_port_url(), tmp_path / "x.bin")]
    jobs += [DownloadJob(server.add(f"/f{i}.bin", BODY), tmp_path / f"f{i}.bin") for i in range(6)]
    with pytest.raises(NoNetworkError):
        download_many(jobs, workers=1, log=lambda _: None, **FAST)
    assert server.requests == []  # the queued jobs were cancelled, not tried one by one


def test_download_many_shows_the_bytes_it_fetched_in_a_log(server, tmp_path, capsys):
    bodies = [os.urandom(1_000_000) for _ in range(3)]
    jobs = [DownloadJob(server.add(f"/f{i}.bin", body), tmp_path / f"f{i}.bin") for i, body in enumerate(bodies)]
    (tmp_path / "f1.bin.part").write_bytes(bodies[1][:400_000])  # resumed: only its rest is fetched
    download_many(jobs, workers=2, log=lambda _: None, **FAST)
    [line] = capsys.readouterr().out.splitlines()  # quick: no line before the last
    assert line.startswith("download 2.6/2.6 MB (100.0%) | ") and line.endswith(" MB/s")


def test_a_batchs_total_is_estimated_from_the_files_that_answered():
    """Before every file has answered, each one that has not counts as the mean of those that have."""
    progress = Progress(None, "download", scale=(1e6, "MB"), stream=io.StringIO())
    transfer = _Transfer(progress, files=4)
    transfer.announced(0, 2_000_000)
    assert progress.total == 8_000_000
    transfer.received(0, 500_000)
    transfer.announced(0, 1_500_000)  # a retry resumes it: still a 2 MB file
    transfer.announced(1, 4_000_000)
    assert progress.total == 12_000_000 and progress.position == 500_000
    transfer.finished(2)  # already there: nothing to fetch
    assert progress.total == 6_000_000 * 4 / 3
    transfer.announced(3, None)  # no Content-Length: it counts once it is done
    transfer.received(3, 300_000)
    transfer.finished(3)
    assert progress.total == 6_300_000
