"""The FastAPI app: routes that parse, hand the request to ``app.state.serving``, and answer.

Parsing is pydantic's (``protocol``), validation and generation the serving
object's (``serving``), answer formats ``responses``'. Middleware, outermost
first: metrics (every answer counted and timed), guards (API key, body size).
"""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST

from . import errors
from . import protocol as P
from .guards import Guards
from .metrics import MetricsMiddleware
from .responses import chat_chunks, chat_response, completion_chunks, completion_response
from .serving import Serving
from .settings import ServerSettings
from .wire import BodyInvalid, parse_json

ERRORS = {status: {"model": P.ErrorResponse} for status in (400, 401, 404, 408, 413, 429, 503)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed in a worker thread


class StrictJSONRequest(Request):
    """A request whose JSON body is read by ``wire.parse_json`` (duplicate keys, NaN, lone surrogates and
    container counts refused) instead of ``json.loads``; large bodies are parsed off the event loop."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = await asyncio.to_thread(parse_json, body) if len(body) > OFF_LOOP_BYTES \
                    else parse_json(body)
            except BodyInvalid as e:
                raise errors.BodyError(str(e), e.param) from None
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))
        return route


def create_app(serving: Serving, settings: ServerSettings) -> FastAPI:
    """An app serving ``serving``'s engine; its lifespan end drains and closes the engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await serving.shutdown()  # uvicorn has already let in-flight requests finish

    app = FastAPI(title="mmfuse", version="1", lifespan=lifespan,
                  description="OpenAI-compatible text generation with named embedding modalities")
    app.router.route_class = StrictJSONRoute
    app.state.serving = serving
    app.state.settings = settings
    metrics = serving.metrics
    errors.install(app, metrics.error)

    @app.get("/health")
    async def health() -> JSONResponse:
        if serving.closing:
            return errors.error_response(503, "shutting down", code="shutting_down")
        return JSONResponse({"status": "ok", "in_flight": serving.in_flight})

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=P.ModelList, responses=ERRORS)
    async def models() -> P.ModelList:
        return serving.models()

    async def respond(job, endpoint: str, start: float, chunks, response):
        """Stream SSE chunks or answer once; the two endpoints differ only in their formats."""
        model, tok = job.model, serving.engine.tokenizer
        if job.stream:
            deltas = await serving.stream(job)  # returns once the first delta is ready
            metrics.first_token.labels(endpoint=endpoint).observe(time.perf_counter() - start)
            return StreamingResponse(chunks(job, deltas, model, tok), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return response(job, await serving.generate(job), model, tok)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, responses=ERRORS)
    async def chat(req: P.ChatCompletionRequest, request: Request):
        start = time.perf_counter()
        return await respond(await serving.check_chat(req), "/v1/chat/completions", start, chat_chunks, chat_response)

    @app.post("/v1/completions", response_model=P.CompletionResponse, responses=ERRORS)
    async def completions(req: P.CompletionRequest, request: Request):
        start = time.perf_counter()
        return await respond(await serving.check_completion(req), "/v1/completions", start, completion_chunks,
                             completion_response)

    routes = {r.path for r in app.routes}
    app.add_middleware(Guards, settings=settings, on_error=metrics.error)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)
    return app
