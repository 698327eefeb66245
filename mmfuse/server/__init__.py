"""OpenAI-compatible HTTP server for mmfuse checkpoints (``mmfuse serve``).

Layout: ``settings`` (limits), ``protocol`` (pydantic request/response models),
``wire`` (embedding decoding), ``serving`` (validation, admission, generation
calls), ``responses`` (answer bodies and SSE chunks),
``engines/`` (async wrappers over the backends), ``guards`` (API key, body size), ``errors``,
``metrics``, ``app`` (routes), ``cli``. Importing this package starts nothing.
"""
from __future__ import annotations

from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "add_serve_args", "run_serve"]


def __getattr__(name):  # fastapi/uvicorn/torch load only when a server is built
    if name == "create_app":
        from .app import create_app
        return create_app
    if name in ("add_serve_args", "run_serve"):
        from . import cli
        return getattr(cli, name)
    raise AttributeError(name)
