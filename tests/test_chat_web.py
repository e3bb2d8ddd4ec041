"""nanochat.chat_web: the OpenAI-compatible API, nanochat's SSE protocol, input limits, the token rule, the
idle timeout, and (marked browser) the chat page in headless Chromium.

A real uvicorn serves each app in a background thread on a free loopback port (or 0.0.0.0, reached at
127.0.0.1). The model is a random 2-layer GPT: tests check protocol, never content.
"""

import contextlib
import json
import shutil
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from nanochat import chat_web  # noqa: E402
from nanochat.chat_requests import Limits, parse_request  # noqa: E402
from nanochat.chat_web import create_app  # noqa: E402

TOKEN = "test-token-0123456789"
MAX_TOKENS = 8
USER = [{"role": "user", "content": "hello there"}]


# -- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_tokenizer):
    """A run folder with a random sft checkpoint and the test tokenizer, as find_chat_model expects."""
    import torch

    from nanochat.checkpoint import CheckpointManager
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("runs") / "web-d2"
    config = GPTConfig(sequence_len=128, vocab_size=400, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT.build(config)
    CheckpointManager(run / "sft" / "checkpoints").save(1, model.state_dict(), {}, {},
                                                         {"model_config": asdict(config)})
    small_tokenizer.save(run / "tok_train" / "tokenizer")
    return run


@pytest.fixture(scope="module")
def engine_and_tokenizer(run_dir):
    from nanochat.engine import Engine
    from nanochat.model_io import find_chat_model, load_model
    from nanochat.tokenizer import Tokenizer

    checkpoint, tokenizer_dir, chat = find_chat_model(run=str(run_dir))
    assert chat
    model, _ = load_model(checkpoint, device="cpu")
    tokenizer = Tokenizer.load(tokenizer_dir)
    return Engine(model, tokenizer), tokenizer


@contextlib.contextmanager
def serve(app, host="127.0.0.1"):
    """Run `app` under uvicorn in a thread; yields the port."""
    sock = chat_web.bind(host, 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def open_url(engine_and_tokenizer):
    """A server bound to 127.0.0.1 without a token."""
    engine, tokenizer = engine_and_tokenizer
    with serve(create_app([engine], tokenizer, model_name="web-d2/sft")) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def token_url(engine_and_tokenizer):
    """A server bound to 0.0.0.0 with a token, reached at 127.0.0.1."""
    engine, tokenizer = engine_and_tokenizer
    with serve(create_app([engine], tokenizer, token=TOKEN, model_name="web-d2/sft"), host="0.0.0.0") as port:
        yield f"http://127.0.0.1:{port}"


class FakeEngine:
    """Yields token 65 ('A' in any byte-level vocab) `delay` seconds apart; or raises; records being closed."""

    def __init__(self, delay=0.0, fail=False):
        self.delay, self.fail, self.closed = delay, fail, threading.Event()

    def generate(self, tokens, num_samples=1, max_tokens=None, **kwargs):
        try:
            for _ in range(max_tokens or 10**9):
                if self.fail:
                    raise RuntimeError("boom")
                time.sleep(self.delay)
                yield [65] * num_samples, [1] * num_samples
        finally:
            self.closed.set()


def sse_events(text: str) -> list:
    """Check the SSE framing and return the payloads (JSON, or the string '[DONE]')."""
    assert text.endswith("\n\n"), text[-200:]
    payloads = []
    for event in text[:-2].split("\n\n"):
        lines = event.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), event
        data = lines[0][len("data: "):]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    assert "[DONE]" not in payloads[:-1]
    return payloads


def assert_json_error(response, statuses=range(400, 500)):
    assert response.status_code in statuses, (response.status_code, response.text)
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]


# -- the OpenAI-compatible API -------------------------------------------------------------------------------

def test_openai_client_chat(open_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{open_url}/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}]
    done = client.chat.completions.create(model="web-d2/sft", messages=messages, max_tokens=MAX_TOKENS,
                                          temperature=0.7, seed=1)
    assert done.object == "chat.completion" and done.model == "web-d2/sft"
    choice = done.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 0 <= done.usage.completion_tokens <= MAX_TOKENS and done.usage.prompt_tokens > 10
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    if choice.finish_reason == "length":
        assert done.usage.completion_tokens == MAX_TOKENS

    # the same request with the same seed streams the same text
    chunks = list(client.chat.completions.create(model="web-d2/sft", messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0.7, seed=1, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert with_choices[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_models_health_stats(open_url):
    models = httpx.get(f"{open_url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["web-d2/sft"]
    assert models["data"][0]["chat"] is True
    health = httpx.get(f"{open_url}/health").json()
    assert health["status"] == "ok" and health["replicas"] == 1
    before = httpx.get(f"{open_url}/stats").json()
    httpx.post(f"{open_url}/v1/chat/completions", json={"messages": USER, "max_tokens": 3}, timeout=60)
    after = httpx.get(f"{open_url}/stats").json()
    assert after["requests_served"] == before["requests_served"] + 1
    assert before["tokens_generated"] <= after["tokens_generated"] <= before["tokens_generated"] + 3
    assert after["queue_depth"] == 0 and after["busy_replicas"] == 0 and after["replicas"] == 1


def test_raw_sse_is_well_formed(open_url):
    body = {"messages": USER, "max_tokens": MAX_TOKENS, "temperature": 1.0, "top_k": 50}
    with httpx.stream("POST", f"{open_url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    assert events[-1]["done"] is True and events[-1]["finish_reason"] in ("stop", "length")
    assert all(set(e) == {"token", "gpu"} and isinstance(e["token"], str) and e["gpu"] == 0 for e in events[:-1])

    with httpx.stream("POST", f"{open_url}/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as response:
        events = sse_events(response.read().decode())
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["finish_reason"] is not None for e in events[:-1]][-1]
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


# -- bad input -----------------------------------------------------------------------------------------------

LIMITS = Limits()
BAD = {
    "malformed json": b'{"messages": [',
    "not an object": [1, 2],
    "no messages": {"messages": []},
    "messages not a list": {"messages": "hi"},
    "too many messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
                          * (LIMITS.max_messages // 2) + [{"role": "user", "content": "c"}]},
    "message too long": {"messages": [{"role": "user", "content": "x" * (LIMITS.max_message_chars + 1)}]},
    "conversation too long": {"messages": [{"role": "user", "content": "x" * LIMITS.max_message_chars},
                                           {"role": "assistant", "content": "y" * LIMITS.max_message_chars}] * 2
                              + [{"role": "user", "content": "z" * LIMITS.max_message_chars}]},
    "temperature 5": {"messages": USER, "temperature": 5},
    "temperature nan": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "temperature string": {"messages": USER, "temperature": "hot"},
    "max_tokens -1": {"messages": USER, "max_tokens": -1},
    "max_tokens 0": {"messages": USER, "max_tokens": 0},
    "max_tokens huge": {"messages": USER, "max_tokens": 10**9},
    "max_tokens float": {"messages": USER, "max_tokens": 2.5},
    "top_k 500": {"messages": USER, "top_k": 500},
    "top_k -1": {"messages": USER, "top_k": -1},
    "top_p 0": {"messages": USER, "top_p": 0},
    "assistant first": {"messages": [{"role": "assistant", "content": "hi"}]},
    "two users": {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    "ends with assistant": {"messages": USER + [{"role": "assistant", "content": "b"}]},
    "system later": {"messages": USER + [{"role": "system", "content": "b"}]},
    "unknown role": {"messages": [{"role": "wizard", "content": "a"}]},
    "content not text": {"messages": [{"role": "user", "content": {"x": 1}}]},
    "message not an object": {"messages": ["hello"]},
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "body too large": b'{"messages": [{"role": "user", "content": "' + b"x" * LIMITS.max_body_bytes + b'"}]}',
}


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_json_error(open_url, path, case):
    body = BAD[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{open_url}{path}", content=content, headers={"Content-Type": "application/json"},
                          timeout=30)
    assert_json_error(response)
    if case == "malformed json":
        assert response.status_code == 400
    if case == "body too large":
        assert response.status_code == 413
    assert httpx.get(f"{open_url}/health").json()["status"] == "ok"


def test_other_bad_requests(open_url):
    assert_json_error(httpx.post(f"{open_url}/chat/completions", content=json.dumps({"messages": USER}),
                                 headers={"Content-Type": "text/plain"}), [415])
    assert_json_error(httpx.post(f"{open_url}/v1/chat/completions", json={"messages": USER, "n": 2}), [400])
    assert_json_error(httpx.post(f"{open_url}/v1/chat/completions", json={"messages": USER, "stream": "yes"}),
                      [400])
    assert_json_error(httpx.get(f"{open_url}/nowhere"), [404])
    assert_json_error(httpx.get(f"{open_url}/chat/completions"), [405])
    # a conversation longer than the model's context (its rotary tables)
    context = httpx.get(f"{open_url}/stats").json()["context"]
    long = {"messages": [{"role": "user", "content": " ".join(["word"] * (context + 10))}]}
    assert_json_error(httpx.post(f"{open_url}/v1/chat/completions", json=long), [400])
    assert httpx.get(f"{open_url}/health").json()["status"] == "ok"


def test_parse_request_merges_the_system_message():
    req = parse_request({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                               {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
                                               {"role": "user", "content": "V"}]}, Limits(), openai=True)
    assert req.messages == [("user", "S\n\nU"), ("assistant", "A"), ("user", "V")]
    assert (req.temperature, req.max_tokens, req.top_k, req.stream) == (0.8, 512, 50, False)


# -- robustness: failures, disconnects, concurrency ----------------------------------------------------------

def test_generation_errors_do_not_kill_the_server(small_tokenizer):
    with serve(create_app([FakeEngine(fail=True)], small_tokenizer)) as port:
        url = f"http://127.0.0.1:{port}"
        for _ in range(2):  # the replica is handed back after a failure: the second request does not hang
            events = sse_events(httpx.post(f"{url}/chat/completions", json={"messages": USER}, timeout=10).text)
            assert events[-1]["error"]["type"] == "server_error"
        response = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER}, timeout=10)
        assert_json_error(response, [500])
        stats = httpx.get(f"{url}/stats").json()
        assert stats["requests_failed"] == 3 and stats["busy_replicas"] == 0
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_disconnect_stops_generation_and_frees_the_replica(small_tokenizer):
    engine = FakeEngine(delay=0.01)
    with serve(create_app([engine], small_tokenizer, limits=Limits(max_tokens=100_000))) as port:
        url = f"http://127.0.0.1:{port}"
        with httpx.stream("POST", f"{url}/chat/completions", json={"messages": USER, "max_tokens": 100_000},
                          timeout=10) as response:
            next(response.iter_lines())
        assert engine.closed.wait(10), "generation went on after the client left"
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/stats").json()["busy_replicas"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_requests_queue_for_replicas_without_blocking_the_loop(small_tokenizer):
    # 20 tokens of 0.1 s: a generation that held the event loop would hold a /stats call for up to 2 s, far from
    # the 1 s allowed, which a loaded 2-core machine's scheduling delays stay under (0.3 s with 0.02 s tokens flaked)
    engines = [FakeEngine(delay=0.1), FakeEngine(delay=0.1)]
    with serve(create_app(engines, small_tokenizer)) as port:
        url = f"http://127.0.0.1:{port}"
        results, depth = [], []

        def ask():
            r = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER, "max_tokens": 20}, timeout=30)
            results.append(r.json()["usage"]["completion_tokens"])

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        start = time.monotonic()
        while any(t.is_alive() for t in threads):
            t0 = time.monotonic()
            stats = httpx.get(f"{url}/stats").json()
            assert time.monotonic() - t0 < 1.0, "the event loop is blocked by generation"
            depth.append(stats["queue_depth"])
            assert stats["busy_replicas"] <= 2
            time.sleep(0.02)
            assert time.monotonic() - start < 30
        assert results == [20] * 4 and max(depth) >= 1
        assert httpx.get(f"{url}/stats").json()["requests_served"] == 4


def test_tool_calls_read_as_text_in_every_reply(small_tokenizer):
    """A real engine runs the calculator for a scripted model; no reply carries the tool's special tokens."""
    from test_engine import ScriptedModel, chain, specials

    from nanochat.engine import Engine

    tok, s = small_tokenizer, specials(small_tokenizer)
    expr, after = tok.encode("3*4"), tok.encode(" ok")[0]
    assert len(set(expr)) == len(expr)
    script = chain(s["assistant_start"], s["python_start"], *expr, s["python_end"])
    script.update({s["output_end"]: after, after: s["assistant_end"]})  # the engine feeds <<=12>> in between
    engine = Engine(ScriptedModel(tok.get_vocab_size(), script, default=s["bos"]), tok)
    expected = "<<3*4=12>>" + tok.decode([after])
    with serve(create_app([engine], tok, model_name="scripted/sft")) as port:
        url, body = f"http://127.0.0.1:{port}", {"messages": USER, "max_tokens": 30, "temperature": 0}
        whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()
        assert whole["choices"][0]["message"]["content"] == expected
        assert whole["choices"][0]["finish_reason"] == "stop"
        chunks = sse_events(httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30).text)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"]) == expected
        events = sse_events(httpx.post(f"{url}/chat/completions", json=body, timeout=30).text)
        assert "".join(e.get("token", "") for e in events) == expected


def test_an_unknown_model_is_a_404_as_openai_answers(open_url):
    openai = pytest.importorskip("openai")
    response = httpx.post(f"{open_url}/v1/chat/completions", json={"model": "gpt-4o", "messages": USER})
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert "gpt-4o" in error["message"] and "web-d2/sft" in error["message"]
    assert_json_error(httpx.post(f"{open_url}/v1/chat/completions", json={"model": 3, "messages": USER}), [400])

    client = openai.OpenAI(base_url=f"{open_url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="web-d2/rl", messages=USER, max_tokens=2)
    assert raised.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    card = client.models.retrieve("web-d2/sft")  # the id /v1/models lists is the one to use
    assert card.id == "web-d2/sft" and card.chat is True
    assert [m.id for m in client.models.list()] == ["web-d2/sft"]


def _post_and_hang_up_later(port: int, body: dict) -> socket.socket:
    """A non-streaming completion sent on a raw socket, left open: closing it is the client hanging up."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _wait_for(url: str, done, what: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while not done(stats := httpx.get(f"{url}/stats").json()):
        assert time.monotonic() < deadline, f"{what}: {stats}"
        time.sleep(0.02)
    return stats


def test_a_client_that_hangs_up_stops_its_generation(engine_and_tokenizer):
    """Real model, real uvicorn: greedy, this model writes 1000 tokens without stopping (many seconds on a CPU)
    unless the client's hanging up stops it. One waiting in the queue that hangs up leaves the queue."""
    engine, tokenizer = engine_and_tokenizer
    long = {"messages": USER, "max_tokens": 1000, "temperature": 0}
    with serve(create_app([engine], tokenizer, limits=Limits(max_tokens=1000))) as port:
        url = f"http://127.0.0.1:{port}"
        first = _post_and_hang_up_later(port, long)
        _wait_for(url, lambda st: st["busy_replicas"] == 1 and st["queue_depth"] == 0, "never started")
        queued = _post_and_hang_up_later(port, long)
        _wait_for(url, lambda st: st["queue_depth"] == 1, "never queued")
        queued.close()
        _wait_for(url, lambda st: st["queue_depth"] == 0, "a client gone stays in the queue", timeout=5)
        first.close()
        stats = _wait_for(url, lambda st: st["busy_replicas"] == 0, "the replica generates for nobody", timeout=5)
        assert stats["requests_cancelled"] == 1 and stats["requests_served"] == 0
        assert stats["tokens_generated"] < 1000
        # the replica is free: the next client is answered at once
        start = time.monotonic()
        reply = httpx.post(f"{url}/v1/chat/completions", json={**long, "max_tokens": 2}, timeout=10)
        assert reply.json()["usage"]["completion_tokens"] == 2 and time.monotonic() - start < 5


# -- the page in a real browser ------------------------------------------------------------------------------

class PinnedSeed:
    """The real engine with a fixed seed, so the random model's reply is the same every run."""

    def __init__(self, engine):
        self.engine, self.model = engine, engine.model

    def generate(self, tokens, **kwargs):
        return self.engine.generate(tokens, **{**kwargs, "seed": 7})


@pytest.mark.browser
def test_chat_page_in_chromium(engine_and_tokenizer, tmp_path):
    chromium, driver_path = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"
    if not (Path(chromium).exists() and Path(driver_path).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    engine, tokenizer = engine_and_tokenizer
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,700"):
        options.add_argument(arg)
    app = create_app([PinnedSeed(engine)], tokenizer, token=TOKEN, model_name="web-d2/sft")
    with serve(app, host="0.0.0.0") as port:
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
        try:
            driver.set_page_load_timeout(30)
            driver.get(f"http://127.0.0.1:{port}/?token={TOKEN}")  # sets the cookie, redirects without it
            assert "token=" not in driver.current_url
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "model").text == "web-d2/sft")
            assert driver.find_element(By.ID, "kind").text == "chat model"
            driver.find_element(By.ID, "max_tokens").clear()
            driver.find_element(By.ID, "max_tokens").send_keys("24")
            driver.find_element(By.ID, "input").send_keys("Hi <b>x</b> & 東京")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
            reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant")
            assert reply.get_attribute("textContent").strip(), "the reply streamed no text"
            assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
            user = driver.find_element(By.CSS_SELECTOR, ".msg.user")
            assert user.text == "Hi <b>x</b> & 東京"  # shown as text ...
            assert not driver.find_elements(By.CSS_SELECTOR, ".msg b")  # ... never parsed as HTML
            assert driver.find_element(By.ID, "send").text == "Send"
            driver.save_screenshot(str(tmp_path / "chat.png"))
            assert (tmp_path / "chat.png").stat().st_size > 1000
            # the same weights served as a base model: the page says so
            with serve(create_app([engine], tokenizer, chat=False, model_name="web-d2/base_train")) as base_port:
                driver.get(f"http://127.0.0.1:{base_port}/")
                wait.until(lambda d: d.find_element(By.ID, "model").text == "web-d2/base_train")
                assert driver.find_element(By.ID, "kind").text.startswith("base model")
                assert "not a chat model" in driver.find_element(By.ID, "empty").text
        finally:
            driver.quit()
