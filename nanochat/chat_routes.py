"""The web chat's routes, added to its app by nanochat.chat_web.create_app (which describes them in words)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import traceback
import uuid
from contextlib import aclosing
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.chat_requests import ApiError, ChatRequest, Limits, build_prompt, parse_request

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(payload) -> str:
    return "data: " + (payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)) + "\n\n"


def add_error_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's own (404, 405...) and unexpected ones included, as a JSON `{"error": ...}`."""

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


def add_page_route(app: FastAPI) -> None:
    """GET /: the chat page, its inline script and style allowed by a fresh CSP nonce on every load."""
    page = resources.files("nanochat").joinpath("web/chat.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        nonce = secrets.token_urlsafe(16)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
               "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
        return HTMLResponse(page.replace("__NONCE__", nonce), headers={
            "Content-Security-Policy": csp, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff"})


def unknown_model(name: str, served: str) -> ApiError:
    """OpenAI's answer to a model it does not have: 404, code model_not_found."""
    return ApiError(404, f"The model `{name}` does not exist: this server serves `{served}` (GET /v1/models)",
                    code="model_not_found")


def add_status_routes(app: FastAPI, generator, *, model_name: str, chat: bool, context: int | None) -> None:
    """GET /v1/models (and /v1/models/{id}), /health and /stats."""
    started, created = time.monotonic(), int(time.time())
    replicas = len(generator.pool.engines)
    # OpenAI's model object; "chat" is ours (false: a base model, which continues text), for the page
    card = {"id": model_name, "object": "model", "created": created, "owned_by": "nanochat", "chat": chat}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise unknown_model(name, model_name)
        return card

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "replicas": replicas}

    @app.get("/stats")
    async def get_stats():
        return {**generator.stats, "queue_depth": generator.pool.waiting, "replicas": replicas,
                "busy_replicas": generator.pool.busy, "uptime_s": round(time.monotonic() - started, 1),
                "model": model_name, "chat": chat, "context": context}


# -- the two chat completion routes --------------------------------------------------------------------------

async def read_json_body(request: Request, max_bytes: int):
    """The body, parsed; it must be declared application/json (no CORS-free posts from other sites) and is read
    no further than max_bytes, whatever Content-Length says."""
    if not request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        raise ApiError(415, "send the request as Content-Type: application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"the request body is larger than {max_bytes} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise ApiError(413, f"the request body is larger than {max_bytes} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


class Completions:
    """What both completion routes share: a POST checked into a prompt, and the reply streamed as SSE."""

    def __init__(self, generator, tokenizer, limits: Limits, chat: bool, context: int | None, model_name: str):
        self.generator, self.tokenizer, self.limits, self.chat, self.context, self.model_name = (
            generator, tokenizer, limits, chat, context, model_name)

    async def read(self, request: Request, openai: bool) -> tuple[ChatRequest, list[int]]:
        body = await read_json_body(request, self.limits.max_body_bytes)
        req = parse_request(body, self.limits, openai)
        if req.model is not None and req.model != self.model_name:
            raise unknown_model(req.model, self.model_name)
        prompt = build_prompt(self.tokenizer, req.messages, self.chat)
        if self.context is not None and len(prompt) >= self.context:
            raise ApiError(400, f"the conversation is {len(prompt)} tokens long; the model's context holds "
                                f"{self.context}: start a new chat", "context_length_exceeded", "messages")
        if self.generator.pool.waiting >= self.limits.max_queue:
            raise ApiError(429, "the server is busy: too many requests waiting, try again later",
                           "rate_limit_error")
        return req, prompt

    def sse_response(self, prompt: list[int], req: ChatRequest, render) -> StreamingResponse:
        """Stream the generator's items as SSE lines, each item rendered by `render` (a generator of lines)."""
        async def lines():
            # on a disconnect the stream is closed, which stops the generation at its next step
            async with aclosing(self.generator.stream(prompt, req)) as items:
                async for item in items:
                    for line in render(item):
                        yield line
        return StreamingResponse(lines(), media_type="text/event-stream", headers=SSE_HEADERS)


def _nanochat_renderer():
    """Renders the generator's items as nanochat's own SSE events; each token names the replica that made it."""
    replica = 0

    def render(item):
        nonlocal replica
        if item[0] == "replica":
            replica = item[1]
        elif item[0] == "text":
            yield _sse({"token": item[1], "gpu": replica})
        elif item[0] == "end":
            yield _sse({"done": True, "finish_reason": item[1], "completion_tokens": item[2]})
        else:
            yield _sse({"error": {"message": item[1], "type": "server_error"}})
    return render


class OpenAIReply:
    """One OpenAI-compatible reply: a whole chat.completion, or its chat.completion.chunk SSE events."""

    def __init__(self, model_name: str, prompt: list[int], req: ChatRequest):
        self.ident, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.model_name, self.prompt_tokens, self.include_usage = model_name, len(prompt), req.include_usage

    def _usage(self, n: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _envelope(self, kind: str) -> dict:
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model_name}

    async def whole(self, items) -> dict:
        """The reply once `items` (the generator's stream) has ended."""
        text, end = [], None
        async with aclosing(items):
            async for item in items:
                if item[0] == "text":
                    text.append(item[1])
                elif item[0] in ("end", "error"):
                    end = item
        if end[0] == "error":
            raise ApiError(500, end[1], "server_error")
        return {**self._envelope("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "finish_reason": end[1], "logprobs": None}],
                "usage": self._usage(end[2])}

    def _chunk(self, delta: dict, finish: str | None = None) -> str:
        return _sse({**self._envelope("chat.completion.chunk"),
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    def events(self, item):
        """Renders one generator item as SSE lines (the role first, on "replica"; [DONE] last)."""
        if item[0] == "replica":
            yield self._chunk({"role": "assistant", "content": ""})
        elif item[0] == "text":
            yield self._chunk({"content": item[1]})
        elif item[0] == "end":
            yield self._chunk({}, item[1])
            if self.include_usage:
                yield _sse({**self._envelope("chat.completion.chunk"), "choices": [], "usage": self._usage(item[2])})
            yield _sse("[DONE]")
        else:
            yield _sse({"error": {"message": item[1], "type": "server_error"}})


async def until_disconnected(request: Request) -> None:
    """Returns once the client hangs up. Called after the body has been read, so that the next message the
    server has for this request is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work) -> Response:
    """The result of the coroutine `work`; cancelled once the client hangs up (without this a client could queue
    long replies and leave, and the replicas would generate them for nobody), then an empty 499 (nginx's
    "client closed request": nobody reads it, the number is for the record)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()  # closes the generator's stream, which stops the generation at its next step
            await asyncio.wait({task})
    if task.cancelled():
        return Response(status_code=499)
    return task.result()


def add_completion_routes(app: FastAPI, completions: Completions) -> None:
    """POST /chat/completions (nanochat's SSE protocol) and /v1/chat/completions (OpenAI's)."""

    @app.post("/chat/completions")
    async def nanochat_completions(request: Request):
        req, prompt = await completions.read(request, openai=False)
        return completions.sse_response(prompt, req, _nanochat_renderer())

    @app.post("/v1/chat/completions")
    async def openai_completions(request: Request):
        req, prompt = await completions.read(request, openai=True)
        reply = OpenAIReply(completions.model_name, prompt, req)
        if not req.stream:
            return await unless_disconnected(request, reply.whole(completions.generator.stream(prompt, req)))
        return completions.sse_response(prompt, req, reply.events)
