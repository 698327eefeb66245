"""ASGI middleware run before any parsing: API key (401) and body size (413).

The body is read here, at most ``max_body_bytes`` of it, whether or not the
client sent a Content-Length (chunked uploads are counted as they arrive), and
then replayed to the app. So no handler ever sees a body over the limit.
"""
from __future__ import annotations

import hmac

from .errors import error_response
from .settings import ServerSettings

PUBLIC = ("/health", "/metrics", "/docs", "/openapi.json")  # everything else needs the key, when one is set


class Guards:
    def __init__(self, app, settings: ServerSettings, on_error):
        self.app, self.settings, self.on_error = app, settings, on_error
        self._expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self._expected is not None and not scope["path"].startswith(PUBLIC):
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
        while True:
            message = await receive()
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

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, status: int, code: str, message: str):
        self.on_error(code)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        await error_response(status, message, code=code, headers=headers)(scope, receive, send)
