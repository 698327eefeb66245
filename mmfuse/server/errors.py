"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}``, never a 500 for client input.

Every way a request can be wrong (bad JSON, schema violations, input rules,
limits, auth, routing) ends here as a 4xx whose ``param`` names the field.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..inputs import InputError

log = logging.getLogger("mmfuse.server")

# status -> OpenAI error type
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable_error", 500: "server_error"}


class APIError(Exception):
    """An error answer with its HTTP status; ``param`` names the offending request field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _path(loc) -> str | None:
    """``("body", "messages", 0, "content", "list[...]", 1, "EncodedEmbedding", "dtype")`` -> ``messages.0.content.1.dtype``.

    Union branch labels (type names) are dropped; they are pydantic's, not the client's. So is the tag
    a tagged union puts after a list index (``content.1.image_url.image_url.url`` -> ``content.1.image_url.url``).
    """
    keep, tagged = [], False
    for i, p in enumerate(loc):
        if isinstance(p, str) and p.startswith("list[tagged-union["):
            tagged = True
        elif tagged and isinstance(p, str) and i > 0 and isinstance(loc[i - 1], int):
            tagged = False  # the discriminator's value, not a field
            continue
        if p != "body" and not (isinstance(p, str) and (
                "[" in p or p[:1].isupper() or p in ("str", "int", "float", "bool", "none"))):
            keep.append(str(p))
    return ".".join(keep) or None


MAX_LISTED_ERRORS = 5  # schema errors spelled out in one answer; the rest are counted


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The schema errors as (message, dotted field path of the most specific one).

    With unions pydantic reports one error per branch; the deepest location is the branch the
    client most likely meant (an embedding object with a bad dtype, not "content is not a string").
    The message lists that one first, then up to ``MAX_LISTED_ERRORS - 1`` others (one per field),
    then how many more there were.
    """
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    best = max(errors, key=lambda e: len(e.get("loc", ())))
    param = _path(best.get("loc", ()))
    if param is None and best.get("type") in ("model_attributes_type", "dict_type"):
        return "the body must be a JSON object, sent with Content-Type: application/json", None
    listed, seen = [f"{param or 'body'}: {best.get('msg', 'invalid value')}"], {param}
    for e in errors:  # union branches of one field collapse to the field's best error
        where = _path(e.get("loc", ()))
        if where in seen or _prefix_of(where, seen):
            continue
        seen.add(where)
        if len(listed) < MAX_LISTED_ERRORS:
            listed.append(f"{where or 'body'}: {e.get('msg', 'invalid value')}")
    rest = len(seen) - len(listed)
    return "; ".join(listed) + (f" (and {rest} more)" if rest > 0 else ""), param


def _prefix_of(where: str | None, seen: set) -> bool:
    return where is not None and any(s is not None and (s.startswith(where + ".") or where.startswith(s + "."))
                                     for s in seen)


class BodyError(HTTPException):
    """A body refused before schema validation (``wire.parse_json``): 400 with the field when known."""

    def __init__(self, message: str, param: str | None = None, code: str = "json_invalid"):
        super().__init__(400, message)
        self.message, self.param, self.code = message, param, code


def install(app: FastAPI, on_error) -> None:
    """Exception handlers; ``on_error(kind)`` counts each answer by kind (for /metrics)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        on_error(exc.code or TYPES.get(exc.status, "error"))
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        on_error("input_error")
        return error_response(400, str(exc), getattr(exc, "param", None), "input_error")

    @app.exception_handler(BodyError)
    async def _body_error(request: Request, exc: BodyError):
        on_error(exc.code)
        return error_response(400, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        on_error("json_invalid" if param is None else "validation_error")
        return error_response(400, message, param, "json_invalid" if param is None else "validation_error")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        on_error(f"http_{exc.status_code}")
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, f"{message}: {request.method} {request.url.path}",
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a server bug: log it, say so, keep serving
        log.exception("internal error on %s", request.url.path)
        on_error("internal")
        return error_response(500, f"internal server error ({type(exc).__name__})", code="internal")
