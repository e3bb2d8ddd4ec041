"""The chat server's access control: no token on loopback, a token everywhere else (header, OpenAI api_key, or the
page's one-time URL that becomes a cookie), and the token file, created for its owner only and refused when others
can read it; the CLI's one-line errors."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from nanochat.chat_auth import token_from_file  # noqa: E402
from nanochat.common import UserError  # noqa: E402

from test_chat_web import TOKEN, USER, assert_json_error, sse_events  # noqa: E402
from test_chat_web import engine_and_tokenizer, open_url, run_dir, token_url  # noqa: E402,F401 (fixtures)


def test_loopback_needs_no_token(open_url):
    page = httpx.get(f"{open_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'fetch("chat/completions"' in page.text and "__NONCE__" not in page.text
    nonce = re.search(r"script-src 'nonce-([^']+)'", page.headers["content-security-policy"]).group(1)
    assert f'<script nonce="{nonce}">' in page.text
    assert httpx.get(f"{open_url}/v1/models").status_code == 200
    # DNS rebinding: a non-loopback Host is refused
    assert_json_error(httpx.get(f"{open_url}/v1/models", headers={"Host": "evil.example:80"}), [403])


def test_token_required_when_not_on_loopback(token_url):
    openai = pytest.importorskip("openai")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for method, path in [("GET", "/"), ("GET", "/v1/models"), ("GET", "/stats"), ("POST", "/chat/completions"),
                         ("POST", "/v1/chat/completions")]:
        body = {"json": {"messages": USER, "max_tokens": 2}} if method == "POST" else {}
        assert_json_error(httpx.request(method, f"{token_url}{path}", **body), [401])
        assert_json_error(httpx.request(method, f"{token_url}{path}", headers={"Authorization": "Bearer nope"},
                                        **body), [401])
        assert_json_error(httpx.request(method, f"{token_url}{path}", cookies={"nanochat_token": "nope"},
                                        **body), [401])
        assert httpx.request(method, f"{token_url}{path}", headers=auth, **body).status_code == 200
    assert httpx.get(f"{token_url}/health").json()["status"] == "ok"  # open for probes

    good = openai.OpenAI(base_url=f"{token_url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    assert good.chat.completions.create(model="web-d2/sft", messages=USER, max_tokens=2).object == "chat.completion"
    bad = openai.OpenAI(base_url=f"{token_url}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_page_token_sets_a_cookie(token_url):
    assert_json_error(httpx.get(f"{token_url}/?token=wrong"), [401])
    redirect = httpx.get(f"{token_url}/?token={TOKEN}&x=1")
    assert redirect.status_code == 303 and redirect.headers["location"] == "./?x=1"  # relative, token dropped
    cookie = redirect.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and TOKEN in cookie
    with httpx.Client(base_url=token_url, follow_redirects=True) as browser:
        page = browser.get(f"/?token={TOKEN}")
        assert page.status_code == 200 and "nanochat" in page.text and "token=" not in str(page.url)
        events = sse_events(browser.post("/chat/completions", json={"messages": USER, "max_tokens": 2}).text)
        assert events[-1]["done"] is True


# -- the command line ----------------------------------------------------------------------------------------

def _env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_cli_generates_a_token_and_exits_when_idle(run_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.chat_web", "--run", str(run_dir), "--host", "0.0.0.0",
                             "--port", "0", "--idle-timeout", "0.05", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = proc.stdout.readline()
        match = re.search(r"open http://[^:/]+:(\d+)/\?token=(\S+)$", line.strip())
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        url, token = f"http://127.0.0.1:{match.group(1)}", match.group(2)
        assert len(token) >= 24
        assert httpx.get(f"{url}/v1/models").status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}).json()
        assert models["data"][0]["id"] == "web-d2/sft"
        start = time.monotonic()
        assert proc.wait(timeout=60) == 0  # 0.05 min = 3 s without requests
        assert time.monotonic() - start >= 2
        assert "exiting" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_reads_the_token_from_its_file_and_never_prints_it(run_dir, tmp_path):
    token_file = tmp_path / "chat.token"
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.chat_web", "--run", str(run_dir), "--host", "0.0.0.0",
                             "--port", "0", "--token-file", str(token_file), "--idle-timeout", "0.05",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = proc.stdout.readline()
        match = re.search(r"open http://[^:/]+:(\d+)/\?token=<the token in (\S+)>$", line.strip())
        assert match and match.group(2) == str(token_file), (line, proc.stderr.read() if proc.poll() else "")
        token = token_file.read_text().strip()  # written by the server: the file did not exist
        assert token_file.stat().st_mode & 0o777 == 0o600 and len(token) >= 24
        url = f"http://127.0.0.1:{match.group(1)}"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert proc.wait(timeout=60) == 0
        assert token not in line + proc.stdout.read() + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_token_file_is_created_for_its_owner_only_and_read_back(tmp_path):
    token_file = tmp_path / "chat.token"
    umask = os.umask(0)  # even where new files would be world-writable
    try:
        token = token_from_file(token_file)
    finally:
        os.umask(umask)
    assert token_file.stat().st_mode & 0o777 == 0o600 and len(token) >= 24
    assert token_from_file(token_file) == token  # a second server on the same file: the same token


def test_a_token_file_others_can_read_is_refused(tmp_path):
    token_file = tmp_path / "chat.token"
    token_file.write_text("secret\n")
    token_file.chmod(0o644)
    with pytest.raises(UserError, match=r"can be read by others \(mode 644\): chmod 600 it"):
        token_from_file(token_file)
    token_file.chmod(0o600)
    token_file.write_text("")
    with pytest.raises(UserError, match="is empty"):
        token_from_file(token_file)


def test_cli_user_errors_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanochat.chat_web", "--run", str(tmp_path / "missing"),
                             "--port", "0"], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
