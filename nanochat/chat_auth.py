"""The web chat's access rules, as ASGI middleware (see nanochat/chat_web.py for the policy in words)."""

from __future__ import annotations

import hmac
import ipaddress
import time
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

from fastapi.responses import JSONResponse

from nanochat.chat_requests import ApiError

COOKIE = "nanochat_token"
UNPROTECTED = {"/health"}  # reachable without the token
NOT_ACTIVITY = {"/health", "/stats"}  # polling these does not keep an idle server alive


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
