"""Serve a trained model in the browser and over an OpenAI-compatible API (FastAPI + uvicorn).

    python -m nanochat.chat_web [--run RUN] [--stage base|sft|rl] [--checkpoint DIR] [--host H] [--port N]
                                [--token T] [--replicas N] [--idle-timeout MIN] [--limit KEY=VALUE ...]

The model is found as for chat_cli (without --run: the newest run; without --stage: rl, else sft, else base).
On start one line is printed with the URL to open (with `?token=...` when a token is needed).

On a cluster, in a job (the server exits by itself after --idle-timeout minutes without requests, which frees
the allocation):

    srun --gres=gpu:1 python -m nanochat.chat_web --host 0.0.0.0 --port 8000 --idle-timeout 30

then open the printed URL through Open OnDemand (`https://ondemand/rnode/<node>/8000/?token=...`, with the
trailing slash: the page uses relative URLs only) or an SSH tunnel (`ssh -L 8000:<node>:8000 login`, then
http://localhost:8000/?token=...). Any OpenAI client works too:

    openai.OpenAI(base_url="http://<node>:8000/v1", api_key="<token>").chat.completions.create(...)

Routes
    GET  /                      the chat page (nanochat/web/chat.html)
    POST /chat/completions      nanochat's own: {"messages", "temperature", "max_tokens", "top_k"} ->
                                SSE `data: {"token": "...", "gpu": i}` ..., then `data: {"done": true, ...}`
    POST /v1/chat/completions   OpenAI-compatible, "stream": true (SSE chat.completion.chunk ..., [DONE]) or not
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", ...} (never needs the token: for probes and load balancers)
    GET  /stats                 requests served, tokens generated, queue depth, replicas

Security. Bound to a loopback address (127.0.0.1, ::1, localhost) without --token, no token is asked for, but
requests must name a loopback Host (against DNS rebinding) and POSTs must be application/json (so another web
site cannot post to it from the browser without a CORS preflight, which is never granted). Bound to any other
address a token is required: --token, or a random one generated and printed. Every route but /health then
checks it, given as `Authorization: Bearer <token>` (the OpenAI client's api_key) or as the cookie the page
sets: a GET with `?token=<token>` sets an HttpOnly, SameSite=Strict cookie and redirects to the same URL
without the token. A wrong or missing token gets 401. The token is compared in constant time. uvicorn's
access log is off (it would log `?token=`); note the token is printed to the job's output file.

Each replica is a full copy of the model (one per GPU; one on CPU). A request waits for a free replica,
generates in a worker thread and hands the replica back; up to `max_queue` requests wait, more get 429.
Limits (`--limit max_tokens=1024` etc., see `Limits`) are checked first; bad input gets a 4xx JSON error
`{"error": {"message", "type"}}`. A base model continues the conversation's text joined by blank lines.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import ipaddress
import json
import math
import secrets
import socket
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, nullcontext
from http.cookies import SimpleCookie
from importlib import resources
from urllib.parse import parse_qsl, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.chat_cli import StreamDecoder, chat_prompt
from nanochat.common import UserError

COOKIE = "nanochat_token"
UNPROTECTED = {"/health"}  # reachable without the token
NOT_ACTIVITY = {"/health", "/stats"}  # polling these does not keep an idle server alive


@dataclasses.dataclass(frozen=True)
class Limits:
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096  # the largest max_tokens a request may ask for (the least is 1)
    default_max_tokens: int = 512
    default_temperature: float = 0.8
    max_temperature: float = 2.0
    default_top_k: int = 50
    max_top_k: int = 200  # 0 = no top-k
    max_queue: int = 64  # requests waiting for a replica; more get 429


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self, headers=None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# -- request validation --------------------------------------------------------------------------------------

@dataclasses.dataclass
class ChatRequest:
    messages: list[tuple[str, str]]  # (role, text); a leading system message already merged into the first user
    temperature: float
    max_tokens: int
    top_k: int
    top_p: float | None = None
    seed: int | None = None
    stream: bool = True
    include_usage: bool = False


def _number(body: dict, key: str, default, lo, hi, integer: bool, lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok:
        raise ApiError(400, f"{key} must be {'an integer' if integer else 'a number'}", param=key)
    if value < lo or value > hi or (lo_open and value == lo):
        raise ApiError(400, f"{key}={value} is out of range: {'(' if lo_open else '['}{lo}, {hi}]", param=key)
    return value


def _text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: text only
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string", param="messages")


def parse_request(body, limits: Limits, openai: bool) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    if len(messages) > limits.max_messages:
        raise ApiError(413, f"too many messages: {len(messages)} > {limits.max_messages}", param="messages")
    turns, total = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role and a content", param="messages")
        role, text = message["role"], _text(message.get("content"), i)
        if len(text) > limits.max_message_chars:
            raise ApiError(413, f"messages[{i}] has {len(text)} characters, more than {limits.max_message_chars}",
                           param="messages")
        total += len(text)
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        expected = ("system", "user") if i == 0 else ("user",) if len(turns) % 2 == 0 else ("assistant",)
        if role not in expected:
            raise ApiError(400, f"messages[{i}] has role {role!r}, expected {' or '.join(map(repr, expected))} "
                                f"(an optional system message, then user and assistant alternating)",
                           param="messages")
        if role == "system":
            system = text
        elif turns or i == 0:
            turns.append((role, text))
        else:  # the first user message after a system message
            turns.append((role, f"{system}\n\n{text}" if system else text))
    if total > limits.max_total_chars:
        raise ApiError(413, f"the conversation has {total} characters, more than {limits.max_total_chars}",
                       param="messages")
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be from the user", param="messages")
    if body.get("max_tokens") is None:  # OpenAI's newer name
        body = {**body, "max_tokens": body.get("max_completion_tokens")}
    req = ChatRequest(
        messages=turns,
        temperature=float(_number(body, "temperature", limits.default_temperature, 0, limits.max_temperature,
                                  False)),
        max_tokens=_number(body, "max_tokens", min(limits.default_max_tokens, limits.max_tokens), 1,
                           limits.max_tokens, True),
        top_k=_number(body, "top_k", limits.default_top_k, 0, limits.max_top_k, True),
        top_p=_number(body, "top_p", None, 0, 1, False, lo_open=True),
        seed=_number(body, "seed", None, 0, 2**63 - 1, True),
    )
    if openai:
        _number(body, "n", 1, 1, 1, True)  # one choice per request
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream")
        req.stream = bool(stream)
        options = body.get("stream_options") or {}
        req.include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return req


def build_prompt(tokenizer, messages: list[tuple[str, str]], chat: bool) -> list[int]:
    if chat:
        return chat_prompt(tokenizer, [(role, tokenizer.encode(text)) for role, text in messages])
    return tokenizer.encode("\n\n".join(text for _, text in messages), prepend=tokenizer.get_bos_token_id())


# -- replicas and generation ---------------------------------------------------------------------------------

class Pool:
    """Free replica indices in an asyncio queue; `waiting` counts requests queued for one."""

    def __init__(self, engines: list):
        self.engines, self.waiting, self.busy, self._free = engines, 0, 0, None

    def _queue(self) -> asyncio.Queue:
        if self._free is None:  # created on first use, inside the server's event loop
            self._free = asyncio.Queue()
            for i in range(len(self.engines)):
                self._free.put_nowait(i)
        return self._free

    async def acquire(self) -> int:
        self.waiting += 1
        try:
            index = await self._queue().get()
        finally:
            self.waiting -= 1
        self.busy += 1
        return index

    def release(self, index: int) -> None:
        self.busy -= 1
        self._queue().put_nowait(index)


def _device_context(engine):
    device = getattr(getattr(engine, "model", None), "get_device", lambda: None)()
    if device is not None and device.type == "cuda":
        import torch
        return torch.cuda.device(device)
    return nullcontext()


class Generator:
    """Runs Engine.generate for one request in a worker thread and streams its text back into the loop."""

    def __init__(self, engines: list, tokenizer, stats: dict):
        self.pool, self.tokenizer, self.stats = Pool(engines), tokenizer, stats
        self.executor = ThreadPoolExecutor(max_workers=len(engines), thread_name_prefix="generate")
        stops = {tokenizer.get_bos_token_id()}
        try:
            stops.add(tokenizer.encode_special("<|assistant_end|>"))
        except Exception:
            pass
        self.stops = stops

    def _work(self, index: int, prompt: list[int], req: ChatRequest, put, cancelled: threading.Event):
        """In a worker thread: put ("text", str) items, then ("end", finish_reason, n_tokens) or ("error", msg)."""
        engine, n, finish = self.pool.engines[index], 0, "length"
        decoder = StreamDecoder(self.tokenizer)
        try:
            with _device_context(engine):
                steps = engine.generate(prompt, num_samples=1, max_tokens=req.max_tokens,
                                        temperature=req.temperature, top_k=req.top_k or None, top_p=req.top_p,
                                        seed=req.seed if req.seed is not None else secrets.randbits(62))
                for column, _ in steps:
                    if cancelled.is_set():
                        finish = "cancelled"
                        break
                    token = column[0]
                    if token in self.stops:
                        finish = "stop"
                        break
                    n += 1
                    text = decoder.push(token)
                    if text:
                        put(("text", text))
                steps.close()
            put(("end", finish, n))
        except Exception as exc:  # reported to the client; the server carries on
            traceback.print_exc()
            put(("error", f"generation failed: {type(exc).__name__}: {exc}", n))

    async def stream(self, prompt: list[int], req: ChatRequest):
        """Async iterator of ("replica", i), ("text", s)..., then ("end", finish, n) or ("error", msg, n)."""
        loop, events, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def put(item):
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown)
                cancelled.set()

        index = await self.pool.acquire()
        try:
            future = loop.run_in_executor(self.executor, self._work, index, prompt, req, put, cancelled)
        except BaseException:
            self.pool.release(index)
            raise
        future.add_done_callback(lambda _: self.pool.release(index))  # only once the thread is done with it
        yield ("replica", index)
        try:
            while True:
                item = await events.get()
                if item[0] == "end":
                    self.stats["requests_served"] += 1
                    self.stats["tokens_generated"] += item[2]
                elif item[0] == "error":
                    self.stats["requests_failed"] += 1
                    self.stats["tokens_generated"] += item[2]
                yield item
                if item[0] in ("end", "error"):
                    return
        finally:
            cancelled.set()  # the client went away (or we are done): stop generating at the next step


# -- authentication and activity -----------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    if header.startswith("["):
        return header[1:].split("]")[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode("utf-8"))


class Guard:
    """ASGI middleware: the token (or, without one, a loopback Host) on every request but /health, and the
    time of the last request for --idle-timeout."""

    def __init__(self, app, token: str | None, activity: dict):
        self.app, self.token, self.activity = app, token, activity

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        denied = self._check(scope)
        if denied is not None:
            return await denied(scope, receive, send)
        tracked = scope["path"] not in NOT_ACTIVITY
        if tracked:
            self.activity["active"] += 1
            self.activity["last"] = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            if tracked:
                self.activity["active"] -= 1
                self.activity["last"] = time.monotonic()

    def _check(self, scope):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is None:
            if not is_loopback(_host_name(headers.get("host", "localhost"))):
                return ApiError(403, "this server is bound to loopback only; the Host header must name "
                                     "localhost", "permission_error").response()
            return None
        if scope["path"] in UNPROTECTED:
            return None
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [v for k, v in query if k == "token"]
        if given and scope["method"] == "GET":
            if not _same(given[0], self.token):
                return self._unauthorized("wrong token in ?token=")
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            location = (scope["path"].rsplit("/", 1)[-1] or "./") + (f"?{rest}" if rest else "")
            response = JSONResponse({"status": "ok"}, status_code=303, headers={"Location": location})
            port = (scope.get("server") or (None, ""))[1]
            response.set_cookie(f"{COOKIE}_{port}", self.token, httponly=True, samesite="strict")
            return response
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and _same(auth[7:].strip(), self.token):
            return None
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except Exception:
            pass
        if any(name.startswith(COOKIE) and _same(m.value, self.token) for name, m in cookies.items()):
            return None
        return self._unauthorized("a token is required: send 'Authorization: Bearer <token>' or open the page "
                                  "once with ?token=<token> (the server printed the URL)" if not auth
                                  else "wrong token")

    @staticmethod
    def _unauthorized(message):
        return ApiError(401, message, "authentication_error").response({"WWW-Authenticate": "Bearer"})


# -- the app -------------------------------------------------------------------------------------------------

def _sse(payload) -> str:
    return "data: " + (payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)) + "\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(engines: list, tokenizer, *, token: str | None = None, limits: Limits = Limits(),
               chat: bool = True, model_name: str = "nanochat") -> FastAPI:
    """The ASGI app serving `engines` (one per replica). token=None: no token, loopback Hosts only."""
    if not engines:
        raise ValueError("create_app needs at least one engine")
    from nanochat.engine import max_positions

    model = getattr(engines[0], "model", None)
    context = max_positions(model) if model is not None else None
    stats = {"requests_served": 0, "requests_failed": 0, "tokens_generated": 0}
    activity = {"last": time.monotonic(), "active": 0}
    generator = Generator(engines, tokenizer, stats)
    started, created = time.monotonic(), int(time.time())
    page = resources.files("nanochat").joinpath("web/chat.html").read_text(encoding="utf-8")

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.activity, app.state.stats, app.state.generator = activity, stats, generator

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response(getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        traceback.print_exc()
        return ApiError(500, f"internal error: {type(exc).__name__}", "server_error").response()

    async def read_request(request: Request, openai: bool) -> tuple[ChatRequest, list[int]]:
        if not request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
            raise ApiError(415, "send the request as Content-Type: application/json")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        req = parse_request(body, limits, openai)
        prompt = build_prompt(tokenizer, req.messages, chat)
        if context is not None and len(prompt) >= context:
            raise ApiError(400, f"the conversation is {len(prompt)} tokens long; the model's context holds "
                                f"{context}: start a new chat", "context_length_exceeded", "messages")
        if generator.pool.waiting >= limits.max_queue:
            raise ApiError(429, "the server is busy: too many requests waiting, try again later",
                           "rate_limit_error")
        return req, prompt

    def sse_response(prompt, req, render) -> StreamingResponse:
        """Stream the generator's items as SSE lines, each item rendered by `render` (a generator of lines)."""
        async def lines():
            async with aclosing(generator.stream(prompt, req)) as items:  # closed (generation stopped) on disconnect
                async for item in items:
                    for line in render(item):
                        yield line
        return StreamingResponse(lines(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        nonce = secrets.token_urlsafe(16)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
               "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
        return HTMLResponse(page.replace("__NONCE__", nonce), headers={
            "Content-Security-Policy": csp, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff"})

    @app.post("/chat/completions")
    async def nanochat_completions(request: Request):
        req, prompt = await read_request(request, openai=False)

        replica = [0]

        def events(item):
            if item[0] == "replica":
                replica[0] = item[1]
            elif item[0] == "text":
                yield _sse({"token": item[1], "gpu": replica[0]})
            elif item[0] == "end":
                yield _sse({"done": True, "finish_reason": item[1], "completion_tokens": item[2]})
            else:
                yield _sse({"error": {"message": item[1], "type": "server_error"}})
        return sse_response(prompt, req, events)

    @app.post("/v1/chat/completions")
    async def openai_completions(request: Request):
        req, prompt = await read_request(request, openai=True)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(n):
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        if not req.stream:
            text, end = [], None
            async with aclosing(generator.stream(prompt, req)) as items:
                async for item in items:
                    if item[0] == "text":
                        text.append(item[1])
                    elif item[0] in ("end", "error"):
                        end = item
            if end[0] == "error":
                raise ApiError(500, end[1], "server_error")
            return {"id": ident, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "finish_reason": end[1], "logprobs": None}],
                    "usage": usage(end[2])}

        def chunk(delta, finish=None):
            return _sse({"id": ident, "object": "chat.completion.chunk", "created": now, "model": model_name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        def events(item):
            if item[0] == "replica":
                yield chunk({"role": "assistant", "content": ""})
            elif item[0] == "text":
                yield chunk({"content": item[1]})
            elif item[0] == "end":
                yield chunk({}, item[1])
                if req.include_usage:
                    yield _sse({"id": ident, "object": "chat.completion.chunk", "created": now,
                                "model": model_name, "choices": [], "usage": usage(item[2])})
                yield _sse("[DONE]")
            else:
                yield _sse({"error": {"message": item[1], "type": "server_error"}})
        return sse_response(prompt, req, events)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "nanochat"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "replicas": len(engines)}

    @app.get("/stats")
    async def get_stats():
        return {**stats, "queue_depth": generator.pool.waiting, "replicas": len(engines),
                "busy_replicas": generator.pool.busy, "uptime_s": round(time.monotonic() - started, 1),
                "model": model_name, "chat": chat, "context": context}

    app.add_middleware(Guard, token=token, activity=activity)
    return app


# -- command line --------------------------------------------------------------------------------------------

def load_replicas(args):
    import torch

    from nanochat.distributed import autodetect_device, compute_dtype
    from nanochat.engine import Engine
    from nanochat.model_io import find_chat_model, load_model
    from nanochat.tokenizer import Tokenizer

    checkpoint, tokenizer_dir, chat = find_chat_model(args.run, args.stage, args.checkpoint)
    tokenizer = Tokenizer.load(tokenizer_dir)
    device_type = args.device or autodetect_device()
    if device_type == "cuda":
        count = torch.cuda.device_count()
        n = args.replicas or count
        if n > count:
            raise UserError(f"--replicas {n}: only {count} GPU(s) visible")
        devices = [torch.device("cuda", i) for i in range(n)]
    else:
        devices = [torch.device(device_type)] * (args.replicas or 1)
    dtype = compute_dtype(device_type)[0]
    engines, meta = [], {}
    for device in devices:
        model, meta = load_model(checkpoint, device=device, compute_dtype=dtype)
        engines.append(Engine(model, tokenizer))
    folder = checkpoint if checkpoint.name != "checkpoints" else checkpoint.parent
    name = f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name
    print(f"loaded {meta['path']} (step {meta['step']}, {'chat' if chat else 'base'} model) on "
          f"{len(devices)} x {device_type}", file=sys.stderr, flush=True)
    return engines, tokenizer, chat, name, device_type


def bind(host: str, port: int) -> socket.socket:
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        return socket.create_server(address[:2], family=family)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _limits(pairs: list[str]) -> Limits:
    fields = {f.name: f for f in dataclasses.fields(Limits)}
    values = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise UserError(f"--limit {pair}: unknown key; valid: {', '.join(fields)}")
        try:
            values[key] = (float if fields[key].type in (float, "float") else int)(value)
        except ValueError:
            raise UserError(f"--limit {pair}: not a number") from None
    return Limits(**values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanochat.chat_web", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run name or folder (default: the newest run)")
    parser.add_argument("--stage", choices=["base", "sft", "rl"], help="default: rl, else sft, else base")
    parser.add_argument("--checkpoint", help="a checkpoint folder (ours or upstream nanochat's)")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; 0.0.0.0 to reach it from "
                        "other machines (Open OnDemand, a tunnel), which requires a token")
    parser.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port")
    parser.add_argument("--token", help="required from clients (default: none on loopback, else generated)")
    parser.add_argument("--replicas", type=int, default=0, help="model copies (default: one per GPU; 1 on CPU)")
    parser.add_argument("--idle-timeout", type=float, default=0, metavar="MIN",
                        help="exit after MIN minutes without requests (default: never)")
    parser.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                        help="change a request limit, e.g. max_tokens=1024 (see Limits)")
    parser.add_argument("--device", default="", help="cuda, cpu or mps (default: autodetect)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    try:
        if args.replicas < 0 or args.idle_timeout < 0:
            raise UserError("--replicas and --idle-timeout must not be negative")
        limits = _limits(args.limit)
        token = args.token or None
        if token is None and not is_loopback(args.host):
            token = secrets.token_urlsafe(24)
        sock = bind(args.host, args.port)
        engines, tokenizer, chat, name, device_type = load_replicas(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    app = create_app(engines, tokenizer, token=token, limits=limits, chat=chat, model_name=name)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False, proxy_headers=False,
                                           timeout_graceful_shutdown=5, lifespan="off"))
    port = sock.getsockname()[1]
    shown = socket.gethostname() if args.host in ("0.0.0.0", "::", "") else args.host
    shown = f"[{shown}]" if ":" in shown else shown
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")

    def watch():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.should_exit:
            return
        print(f"nanochat chat_web: {name} on {len(engines)} {device_type} replica(s): open {url}", flush=True)
        while args.idle_timeout and not server.should_exit:
            activity = app.state.activity
            idle = 0 if activity["active"] else time.monotonic() - activity["last"]
            if idle >= args.idle_timeout * 60:
                print(f"nanochat chat_web: no requests for {args.idle_timeout:g} min: exiting", flush=True)
                server.should_exit = True
            time.sleep(min(5.0, args.idle_timeout * 60 / 10))

    threading.Thread(target=watch, daemon=True, name="watch").start()
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
