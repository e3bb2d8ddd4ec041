"""Serve a trained model in the browser and over an OpenAI-compatible API (FastAPI + uvicorn).

    python -m nanochat.chat_web [RUN] [--runs-root DIR] [--stage base|sft|rl] [--checkpoint DIR] [--host H]
                                [--port N] [--token-file F] [--replicas N] [--idle-timeout MIN] [--limit KEY=VALUE ...]

The model is found as for chat_cli (without a run: the newest run; without --stage: rl, else sft, else base; the
launcher's runs_root=DIR run_name=RUN work too, see nanochat/chat_args.py). Its id is `<run>/<stage folder>`
(with --checkpoint: the checkpoint's last two folders).
On start one line is printed with the URL to open (with `?token=...` when a token was generated, or naming
the --token-file the token is in).

On a cluster, in a job (the server exits by itself after --idle-timeout minutes without requests, which frees
the allocation):

    srun --gres=gpu:1 python -m nanochat.chat_web --host 0.0.0.0 --port 8000 --idle-timeout 30 \
        --token-file ~/.nanochat-chat.token

then open the printed URL through Open OnDemand (`https://ondemand/rnode/<node>/8000/?token=...`, with the
trailing slash: the page uses relative URLs only) or an SSH tunnel (`ssh -L 8000:<node>:8000 login`, then
http://localhost:8000/?token=...). Any OpenAI client works too:

    openai.OpenAI(base_url="http://<node>:8000/v1", api_key="<token>").chat.completions.create(...)

Routes
    GET  /                      the chat page (nanochat/web/chat.html)
    POST /chat/completions      nanochat's own: {"messages", "temperature", "max_tokens", "top_k"} ->
                                SSE `data: {"token": "...", "gpu": i}` ..., then `data: {"done": true, ...}`
    POST /v1/chat/completions   OpenAI-compatible, "stream": true (SSE chat.completion.chunk ..., [DONE]) or not;
                                "model" is the served id or left out (another: 404, code model_not_found)
    GET  /v1/models[/ID]        the one model served (OpenAI's model object, plus "chat": false for a base model)
    GET  /health                {"status": "ok", ...} (never needs the token: for probes and load balancers)
    GET  /stats                 requests served, failed and cancelled (the client left), tokens generated, queue
                                depth, replicas

Security. Bound to a loopback address (127.0.0.1, ::1, localhost) without --token-file, no token is asked for, but
requests must name a loopback Host (against DNS rebinding) and POSTs must be application/json (so another web site
cannot post to it from the browser without a CORS preflight, which is never granted). Bound to any other address a
token is required: the one in --token-file (a fresh one is written there, mode 0600, if the file does not exist), or
a random one generated and printed. Every route but /health then checks it, given as `Authorization: Bearer <token>`
(the OpenAI client's api_key) or as the cookie the page sets: a GET with `?token=<token>` sets an HttpOnly,
SameSite=Strict cookie and redirects to the same URL without the token. A wrong or missing token gets 401. The token
is compared in constant time. uvicorn's access log is off (it would log `?token=`). There is no --token option: `ps`
shows a command line to every user of the node. In a job, pass --token-file so that the token stays out of the job's
log, which others may read.

Each replica is a full copy of the model (one per GPU; one on CPU). A request waits for a free replica,
generates in a worker thread and hands the replica back; up to `max_queue` requests wait, more get 429.
Limits (`--limit max_tokens=1024` etc., see `Limits`) are checked first; bad input gets a 4xx JSON error
`{"error": {"message", "type", "param", "code"}}`. A base model continues the conversation's text joined by blank
lines. The calculator calls a chat model makes read as `<<2*2=4>>` in every reply (nanochat/chat_text.py), not as
special tokens nor as OpenAI tool_calls: the engine has run them, so the client has nothing left to do. A client
that hangs up stops its generation at the next token, streaming or not (a non-streaming one gets 499).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import secrets
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

from fastapi import FastAPI

from nanochat.chat_args import add_model_arguments, apply_words
from nanochat.chat_auth import Guard, is_loopback, token_from_file
from nanochat.chat_requests import ChatRequest, Limits
from nanochat.chat_routes import (Completions, add_completion_routes, add_error_handlers, add_page_route,
                                  add_status_routes)
from nanochat.chat_text import ReplyText
from nanochat.common import UserError


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
        """In a worker thread: put ("text", str) items, then ("end", finish_reason, n_tokens) or ("error", msg, n);
        returns (finish_reason or "error", n_tokens) for the stats."""
        engine, n, finish = self.pool.engines[index], 0, "length"
        text = ReplyText(self.tokenizer)
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
                    new = text.push(token)
                    if new:
                        put(("text", new))
                steps.close()
            rest = text.finish()
            if rest:
                put(("text", rest))
            put(("end", finish, n))
            return finish, n
        except Exception as exc:  # reported to the client; the server carries on
            traceback.print_exc()
            put(("error", f"generation failed: {type(exc).__name__}: {exc}", n))
            return "error", n

    def _finished(self, index: int, future) -> None:
        """In the loop, once the worker thread is done: the replica back to the pool, the request counted (also
        when its client left before the end, which no stream reads)."""
        self.pool.release(index)
        finish, n = future.result()
        self.stats["tokens_generated"] += n
        outcome = {"error": "requests_failed", "cancelled": "requests_cancelled"}.get(finish, "requests_served")
        self.stats[outcome] += 1

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
        future.add_done_callback(lambda done: self._finished(index, done))  # once the thread is done with it
        yield ("replica", index)
        try:
            while True:
                item = await events.get()
                yield item
                if item[0] in ("end", "error"):
                    return
        finally:
            cancelled.set()  # the client went away (or we are done): stop generating at the next step


# -- the app -------------------------------------------------------------------------------------------------

def create_app(engines: list, tokenizer, *, token: str | None = None, limits: Limits = Limits(),
               chat: bool = True, model_name: str = "nanochat") -> FastAPI:
    """The ASGI app serving `engines` (one per replica). token=None: no token, loopback Hosts only."""
    if not engines:
        raise ValueError("create_app needs at least one engine")
    from nanochat.engine import max_positions

    model = getattr(engines[0], "model", None)
    context = max_positions(model) if model is not None else None
    stats = {"requests_served": 0, "requests_failed": 0, "requests_cancelled": 0, "tokens_generated": 0}
    activity = {"last": time.monotonic(), "active": 0}
    generator = Generator(engines, tokenizer, stats)

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.activity = activity  # read by main's idle watch
    add_error_handlers(app)
    add_page_route(app)
    add_completion_routes(app, Completions(generator, tokenizer, limits, chat, context, model_name))
    add_status_routes(app, generator, model_name=model_name, chat=chat, context=context)
    app.add_middleware(Guard, token=token, activity=activity)
    return app


# -- command line --------------------------------------------------------------------------------------------

def load_replicas(args):
    import torch

    from nanochat.distributed import autodetect_device, compute_dtype
    from nanochat.engine import Engine
    from nanochat.model_io import find_chat_model, load_model
    from nanochat.tokenizer import Tokenizer

    checkpoint, tokenizer_dir, chat = find_chat_model(args.run, args.stage, args.checkpoint, args.runs_root)
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
        engines.append(Engine(model.for_inference(), tokenizer))
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
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; 0.0.0.0 to reach it from "
                        "other machines (Open OnDemand, a tunnel), which requires a token")
    parser.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port")
    parser.add_argument("--token-file", metavar="FILE", help="the token clients must send, read from FILE (written "
                        "with a fresh one, mode 0600, if missing); default: none on loopback, else generated and "
                        "printed")
    parser.add_argument("--replicas", type=int, default=0, help="model copies (default: one per GPU; 1 on CPU)")
    parser.add_argument("--idle-timeout", type=float, default=0, metavar="MIN",
                        help="exit after MIN minutes without requests (default: never)")
    parser.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                        help="change a request limit, e.g. max_tokens=1024 (see Limits)")
    parser.add_argument("--device", default="", help="cuda, cpu or mps (default: autodetect)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_intermixed_args(argv)
    try:
        apply_words(args)
        if args.replicas < 0 or args.idle_timeout < 0:
            raise UserError("--replicas and --idle-timeout must not be negative")
        limits = _limits(args.limit)
        token = token_from_file(args.token_file) if args.token_file else None
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
    url = f"http://{shown}:{port}/" + (f"?token=<the token in {args.token_file}>" if args.token_file
                                       else f"?token={token}" if token else "")

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
