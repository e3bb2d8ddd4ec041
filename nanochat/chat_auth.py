"""The web chat's access rules, as ASGI middleware (see nanochat/chat_web.py for the policy in words)."""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import time
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from fastapi.responses import JSONResponse

from nanochat.chat_requests import ApiError
from nanochat.common import UserError

COOKIE = "nanochat_token"
UNPROTECTED = {"/health"}  # reachable without the token
NOT_ACTIVITY = {"/health", "/stats"}  # polling these does not keep an idle server alive


def token_from_file(path: str | Path) -> str:
    """The token in `path`; where there is no such file, a fresh token written there first. The file is created
    with mode 0600 (O_EXCL: never readable by others, not even for a moment), and one that others can read is
    refused: the token is a password, so it goes in a file, not on a command line (`ps` shows those to every
    user of the node) nor into a job's log."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise UserError(f"token file {path} can be read by others (mode {mode:03o}): chmod 600 it") from None
        token = path.read_text().strip()
        if not token:
            raise UserError(f"token file {path} is empty")
        return token
    except OSError as exc:
        raise UserError(f"cannot write the token file {path}: {exc.strerror}") from None
    token = secrets.token_urlsafe(24)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


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
