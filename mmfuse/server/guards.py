"""Limits enforced before any parsing: headers, body and answer time, API key (401), body size (413).

- ``header_timeout_protocol``: uvicorn's HTTP protocol with a timer from the connection's start
  (and from the end of each answer on a kept-alive connection) until a request's headers are
  complete; a client that trickles headers is disconnected after ``header_timeout_s``.
- ``Guards`` (ASGI): the API key; the body, read here within ``body_timeout_s`` (else 408 and the
  connection is closed) and at most ``max_body_bytes`` of it, whether or not the client sent a
  Content-Length (chunked uploads are counted as they arrive), then replayed to the app, so no
  handler ever sees a body over the limit; and ``request_timeout_s`` for the whole answer.
"""
from __future__ import annotations

import asyncio
import hmac

from .errors import error_response
from .settings import ServerSettings

PUBLIC = ("/health",)  # everything else needs the key, when one is set
DOCS = ("/metrics", "/docs", "/redoc", "/openapi.json")  # public too with --public-metrics


def header_timeout_protocol(seconds: float):
    """uvicorn's default HTTP protocol class (httptools, else h11) with a header read timeout."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeoutProtocol(AutoHTTPProtocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()  # the next request's headers get the same time

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._header_timed_out)

        def _header_timed_out(self) -> None:
            self._header_timer = None
            busy = self.cycle is not None and not self.cycle.response_complete  # headers complete, answering
            if not busy and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


class Guards:
    def __init__(self, app, settings: ServerSettings, on_error):
        self.app, self.settings, self.on_error = app, settings, on_error
        self._expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None
        self._public = PUBLIC + (DOCS if settings.public_metrics else ())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self._expected is not None and not scope["path"].startswith(self._public):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                return await self._refuse(scope, receive, send, 401, "authentication",
                                          "missing or wrong API key: send 'Authorization: Bearer KEY'")
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._refuse(scope, receive, send, 400, "bad_content_length",
                                          f"Content-Length: not a number ({declared[:32]!r})")
            if int(declared) > limit:
                return await self._refuse(scope, receive, send, 413, "body_too_large",
                                          f"request body of {int(declared)} bytes exceeds the limit of {limit}")
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                return await self._refuse(scope, receive, send, 408, "body_timeout",
                                          f"the request body did not arrive within {self.settings.body_timeout_s:g} s "
                                          f"({size} bytes came)", close=True)
            if message["type"] != "http.request":  # client went away before the body was complete
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._refuse(scope, receive, send, 413, "body_too_large",
                                          f"request body exceeds the limit of {limit} bytes")
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for a disconnect, as usual

        started = False

        async def send_and_see(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, replay, send_and_see), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            if not started:  # else a stream is cut short: the connection closes without its end
                await self._refuse(scope, receive, send, 503, "request_timeout",
                                   f"the answer took longer than this server's limit of "
                                   f"{self.settings.request_timeout_s:g} s")

    async def _refuse(self, scope, receive, send, status: int, code: str, message: str, close: bool = False):
        self.on_error(code)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if close:
            headers["Connection"] = "close"
        await error_response(status, message, code=code, headers=headers or None)(scope, receive, send)
