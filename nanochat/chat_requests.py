"""The web chat's request checking: limits, the request body as the two APIs define it, the prompt.

Everything a client can send is checked here before it reaches a model; a mistake is an ApiError, which the
server turns into a 4xx JSON error `{"error": {"message", "type"}}`.
"""

from __future__ import annotations

import dataclasses
import math

from fastapi.responses import JSONResponse

from nanochat.chat_cli import chat_prompt


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
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self, headers=None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
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
    model: str | None = None  # OpenAI's: the model asked for (None: not named, the one served)


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
        req.model = body.get("model")
        if req.model is not None and not isinstance(req.model, str):
            raise ApiError(400, "model must be a string", param="model")
    return req


def build_prompt(tokenizer, messages: list[tuple[str, str]], chat: bool) -> list[int]:
    if chat:
        return chat_prompt(tokenizer, [(role, tokenizer.encode(text)) for role, text in messages])
    return tokenizer.encode("\n\n".join(text for _, text in messages), prepend=tokenizer.get_bos_token_id())
