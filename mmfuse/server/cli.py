"""``mmfuse serve``: arguments -> ``ServerSettings`` -> engine -> app -> uvicorn.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections and waits up to
``--graceful-shutdown`` seconds for in-flight requests, then the app's lifespan
drains the engine; the process exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal

from ..quantization import SHORTHANDS as QUANTIZE_SHORTHANDS
from .settings import BACKENDS, ServerSettings

log = logging.getLogger("mmfuse.server")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The options of ``mmfuse serve`` (one per ``ServerSettings`` field)."""
    d = ServerSettings(model="-")
    p.add_argument("model", metavar="CKPT", help="mmfuse checkpoint directory or hub id")
    p.add_argument("--host", default=d.host, help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", default=os.environ.get("MMFUSE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MMFUSE_API_KEY; unset = open)")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS)
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: CKPT as given)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA adapter (peft directory) over the checkpoint's LM, repeatable: a request whose "
                        "`model` is NAME runs with it; listed in /v1/models (default: none)")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="Jinja chat template for /v1/chat/completions, a file or the text itself (default: the "
                        "tokenizer's)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="413 above this")
    lim.add_argument("--max-items-per-modality", type=int, default=None,
                     help="cap below each modality's own max_items")
    lim.add_argument("--max-prompt-tokens", type=int, default=None, help="after items expand to soft tokens")
    lim.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit, help="largest max_tokens")
    lim.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    lim.add_argument("--max-n", type=int, default=d.max_n, help="completions per request")
    lim.add_argument("--max-queue", type=int, default=d.max_queue, help="requests in flight; 429 beyond")
    lim.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings, help="stop strings per request")
    lim.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, help="characters per stop string")
    lim.add_argument("--header-timeout", dest="header_timeout_s", type=float, default=d.header_timeout_s,
                     help="seconds for a request's headers to arrive; the connection is closed beyond")
    lim.add_argument("--body-timeout", dest="body_timeout_s", type=float, default=d.body_timeout_s,
                     help="seconds for a request's body to arrive after its headers; 408 beyond")
    lim.add_argument("--request-timeout", dest="request_timeout_s", type=float, default=d.request_timeout_s,
                     help="seconds for a whole answer, streams included; 503 beyond")
    lim.add_argument("--max-connections", type=int, default=d.max_connections,
                     help="concurrent connections and requests; 503 beyond")
    lim.add_argument("--public-metrics", action="store_true",
                     help="serve /metrics, /openapi.json and /docs without the API key")
    media = p.add_argument_group("raw media (image_url and input_audio parts)")
    # comma-separated and repeatable rather than nargs="+", which would swallow a CKPT given after it
    media.add_argument("--allowed-media-domains", action="extend", default=[], metavar="DOMAIN[,DOMAIN...]",
                       type=lambda v: [d for d in v.split(",") if d.strip()],
                       help="fetch http(s) image URLs from these hosts and their subdomains (default: none, "
                            "data: URLs only)")
    media.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                       help="width x height, checked before decoding (decompression bombs get a 400)")
    media.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds,
                       help="clip duration, checked before decoding")
    eng = p.add_argument_group("engine")
    eng.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                     help="most requests generated together (default: 32 on transformers; vLLM's own "
                          "max_num_seqs on vLLM, as `vllm serve`)")
    eng.add_argument("--dtype", default=d.dtype)
    eng.add_argument("--device", default=None, help="transformers backend device")
    eng.add_argument("--torch-threads", type=int, default=None, help="transformers backend CPU threads")
    eng.add_argument("--quantization-config", default=None, choices=sorted(QUANTIZE_SHORTHANDS),
                     help="transformers backend: quantize the LM as it loads (vLLM runs a quantized checkpoint "
                          "as stored)")
    eng.add_argument("--max-model-len", type=int, default=None, help="vLLM backend context length")
    eng.add_argument("--kv-cache-gb", type=float, default=None,
                     help="vLLM backend KV cache size in GiB (default: from free memory on CPU)")
    eng.add_argument("--gpu-memory-utilization", type=float, default=None,
                     help="vLLM backend fraction of device memory (of RAM on CPU); instead of --kv-cache-gb")
    eng.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size,
                     help="vLLM backend tensor-parallel ranks (each layer sharded across them)")
    eng.add_argument("--pipeline-parallel-size", type=int, default=d.pipeline_parallel_size,
                     help="vLLM backend pipeline-parallel ranks (consecutive layers on each)")
    eng.add_argument("--distributed-executor-backend", default=None, choices=["mp", "ray"],
                     help="vLLM backend: how ranks start; ray for a Ray cluster across nodes (default: vLLM's, "
                          "processes on this node)")
    eng.add_argument("--graceful-shutdown", dest="graceful_shutdown_s", type=float, default=d.graceful_shutdown_s,
                     help="seconds in-flight requests get after SIGTERM")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    names = {f.name for f in dataclasses.fields(ServerSettings) if f.init}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["lora"] = tuple(values.get("lora") or ())
    return ServerSettings(**values)


def run_serve(args: argparse.Namespace) -> int:
    """Build the engine, serve until SIGTERM/SIGINT, drain, return 0."""
    import uvicorn

    from .app import create_app
    from .engines import make_engine
    from .metrics import Metrics
    from .serving import Serving

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    metrics = Metrics()
    engine = make_engine(settings, on_batch=metrics.batch)
    app = create_app(Serving(engine, settings, metrics), settings)
    log.info("serving %s (%s backend) on http://%s:%d", settings.served_model_name, engine.name, settings.host,
             settings.port)
    # uvicorn re-raises the signal it caught once it has shut down gracefully; with this handler in place
    # that second delivery is a no-op, so a requested stop is a clean exit (status 0), not a kill
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    from .guards import header_timeout_protocol
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=settings.graceful_shutdown_s, access_log=False,
                            limit_concurrency=settings.max_connections,
                            http=header_timeout_protocol(settings.header_timeout_s))
    uvicorn.Server(config).run()
    return 0
