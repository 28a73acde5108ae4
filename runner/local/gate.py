"""What every request passes before it reaches an endpoint: the optional bearer token, the
request log, and the guard that keeps one failing request from costing its connection.

- **Token** (``local up --token``, handed to the server in ``state.TOKEN_ENV``): every
  request but the health check must carry it, as ``Authorization: Bearer <token>`` (the
  SDK's control plane, deployments and completions) or ``X-API-Key`` (its trainer data
  plane), so clients set ``FIREWORKS_API_KEY`` to it. Anything else is a 401.
- **Request log** (the server's output, ``service.log`` in the state dir): one line per
  refused request (status 400 and up) naming method, path, status, time and the error
  message, so a user whose program fails against the service sees which call was refused;
  with ``--log-requests`` one line for every request. Never a header, a body or a query
  string (they can hold keys); messages have the request's credentials and any secret
  from the environment masked (``firetitan_track.redact``).
- **Unexpected errors** become a 500 with the error's type and message, logged with its
  traceback, and the connection stays usable: Starlette's own last-resort handler answers
  and then re-raises, which makes the server drop the client's kept-alive connection.
"""

from __future__ import annotations

import hmac
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
from starlette.datastructures import Headers

from firetitan_track.redact import redact_text, secret_values

from .wire import error_response

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEALTH_PATH = "/local/v1/healthz"  # open without a token: `local up` and the runner probe it, it tells nothing

requests_log = logging.getLogger("runner.local.requests")
_MESSAGE_BYTES = 2048  # of an error body kept for the log line
# Credentials shorter than this are not masked in messages: "local", the API key the
# tests and docs use, would otherwise mask every "accounts/local/..." in the log.
_MIN_MASKED_LEN = 8


def _credentials(headers: Headers) -> list[str]:
    """The values a request authenticates with (what the log must never show)."""
    found = []
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        found.append(value.strip())
    elif authorization:
        found.append(authorization)
    if headers.get("x-api-key"):
        found.append(headers["x-api-key"])
    return found


@dataclass
class _Sent:
    """What a request's response has sent so far, for its log line."""

    status: int | None = None
    error: bytearray = field(default_factory=bytearray)  # the start of an error body


class RequestGate:
    """Pure ASGI middleware (streams pass through untouched)."""

    def __init__(self, app: ASGIApp, *, token: str | None = None, log_requests: bool = False):
        self.app = app
        self.token = token
        self.log_requests = log_requests
        if log_requests:
            requests_log.setLevel(logging.INFO)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        credentials = _credentials(headers)
        sent = _Sent()

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent.status = message["status"]
            elif message["type"] == "http.response.body" and (sent.status or 0) >= 400:
                room = _MESSAGE_BYTES - len(sent.error)
                if room > 0:
                    sent.error += message.get("body", b"")[:room]
            await send(message)

        if self.token is not None and scope["path"] != HEALTH_PATH and not self._authorized(credentials):
            response = error_response(401, "this local service requires its token: send it as the API key "
                                           "(FIREWORKS_API_KEY, i.e. Authorization: Bearer <token> or X-API-Key)")
            await response(scope, receive, recording_send)
        else:
            try:
                await self.app(scope, receive, recording_send)
            except Exception as exc:
                if sent.status is not None:
                    raise  # the response is under way; nothing sound can be sent any more
                message = self._mask(f"internal error: {type(exc).__name__}: {exc}", credentials)
                requests_log.error("%s %s failed:\n%s", scope["method"], scope["path"],
                                   self._mask(traceback.format_exc(), credentials))
                await error_response(500, message)(scope, receive, recording_send)
        self._log(scope, sent, time.perf_counter() - started, credentials)

    def _mask(self, text: str, credentials: list[str]) -> str:
        secrets = [value for value in credentials + secret_values() if len(value) >= _MIN_MASKED_LEN]
        return redact_text(text, secrets + ([self.token] if self.token else []))

    def _authorized(self, credentials: list[str]) -> bool:
        return any(hmac.compare_digest(value.encode(), self.token.encode()) for value in credentials)

    def _log(self, scope: Scope, sent: _Sent, elapsed_s: float, credentials: list[str]) -> None:
        status = sent.status or 0
        if status < 400 and not self.log_requests:
            return
        line = f"{scope['method']} {scope['path']} -> {status} in {1e3 * elapsed_s:.1f} ms"
        if status >= 400:
            line = f"refused {line}: {_error_message(bytes(sent.error))}"
            requests_log.warning("%s", self._mask(line, credentials))
        else:
            requests_log.info("%s", line)


def _error_message(body: bytes) -> str:
    """The message of an error body (``{"error": {"message": ...}}``), else its text."""
    try:
        message = orjson.loads(body)["error"]["message"]
        if isinstance(message, str):
            return message
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    return body.decode("utf-8", "replace")
