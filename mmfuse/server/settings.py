"""Server settings: one typed dataclass, validated once, shared by the app, the guards and the engines."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..backends import BACKENDS
from ..config import ConfigError
from ..media import MediaLimits
from ..quantization import SHORTHANDS as QUANTIZE_SHORTHANDS

_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$|^[0-9.]+$")


@dataclass
class ServerSettings:
    """What ``mmfuse serve`` serves and the limits it enforces on each request."""

    model: str  # checkpoint directory or hub id
    served_model_name: str | None = None  # the id clients send as `model`; None = `model` as given
    # LoRA adapters over the checkpoint's LM, "NAME=PATH" each: a request whose `model` is NAME runs with it
    lora: tuple[str, ...] = ()
    adapters: dict = field(init=False, repr=False)  # NAME -> mmfuse.lora.LoraAdapter, checked once
    chat_template: str | None = None  # a Jinja chat template (file path or text) instead of the tokenizer's
    backend: str = "auto"  # auto: vLLM when importable, else transformers
    host: str = "127.0.0.1"  # loopback by default: exposing a server is an explicit choice
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer KEY`
    # request limits (each one answers with a 4xx, never by running out of memory)
    max_body_bytes: int = 16 * 2**20  # 413 above this; 16 MiB = 4M float32 values
    max_items_per_modality: int | None = None  # server cap below each modality's own max_items
    max_prompt_tokens: int | None = None  # after items expand to soft tokens; None = model length only
    max_tokens_limit: int = 2048  # largest max_tokens a request may ask for
    default_max_tokens: int = 64  # when a request gives none
    max_n: int = 8  # completions per request
    max_queue: int = 256  # requests waiting or running; 429 beyond
    max_stop_strings: int = 4  # stop strings per request (OpenAI's limit; at most sampling.MAX_STOP_STRINGS)
    max_stop_chars: int = 512  # characters per stop string (at most sampling.MAX_STOP_CHARS)
    # connection limits: slow or stalled clients cannot hold connections or the engine
    header_timeout_s: float = 10.0  # a request's headers must arrive within this; else the connection is closed
    body_timeout_s: float = 30.0  # its body within this after the headers; else 408 and the connection is closed
    request_timeout_s: float = 600.0  # a request's whole answer (streams included); 503 (or the stream ends) beyond
    max_connections: int = 512  # concurrent connections plus requests (uvicorn limit_concurrency); 503 beyond
    public_metrics: bool = False  # /metrics, /openapi.json and /docs without the API key (/health always is)
    # raw media parts (image_url, input_audio): defaults and their reasons in mmfuse.media.MediaLimits
    max_image_pixels: int = MediaLimits.max_image_pixels  # width x height, read from the header before decoding
    max_audio_seconds: float = MediaLimits.max_audio_seconds  # read from the header before decoding
    # hosts (and their subdomains) whose http(s) image URLs are fetched; empty = data: URLs only, so that a
    # client cannot make the server reach into its own network
    allowed_media_domains: tuple[str, ...] = ()
    media_limits: MediaLimits = field(init=False, repr=False)  # the three above, validated once
    # engine
    # most requests generated together; None = 32 on transformers, vLLM's own max_num_seqs on vLLM (what
    # `vllm serve` uses: a lower cap there splits a burst into waves, for no saving in memory)
    max_batch_size: int | None = None
    dtype: str = "float32"  # fp32 on CPU: bf16 matmuls are far slower there
    device: str | None = None  # transformers backend; None = cuda if available else cpu
    torch_threads: int | None = None  # transformers on CPU; None = torch's default. 1 suits tiny models
    # and shared machines, where idle OpenMP threads spin against other processes
    quantization_config: str | None = None  # transformers backend: quantize the LM on load (mmfuse.quantization)
    max_model_len: int | None = None  # vLLM backend; None = the model's own
    kv_cache_gb: float | None = None  # vLLM backend; None = from free memory on CPU, vLLM's default on GPU
    gpu_memory_utilization: float | None = None  # vLLM backend: fraction of device memory (RAM on CPU)
    tensor_parallel_size: int = 1  # vLLM backend: ranks sharding each layer
    pipeline_parallel_size: int = 1  # vLLM backend: ranks holding consecutive layers
    distributed_executor_backend: str | None = None  # vLLM backend: "ray" for ranks across nodes; None = vLLM's
    graceful_shutdown_s: float = 60.0  # SIGTERM: how long in-flight requests may take to finish

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        positive = ("port", "max_body_bytes", "max_tokens_limit", "default_max_tokens", "max_n", "max_queue",
                    "max_stop_strings", "max_stop_chars", "max_connections")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0 seconds, got {getattr(self, name)}")
        from ..sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS
        if self.max_stop_strings > MAX_STOP_STRINGS or self.max_stop_chars > MAX_STOP_CHARS:
            raise ConfigError(f"max_stop_strings/max_stop_chars: at most {MAX_STOP_STRINGS}/{MAX_STOP_CHARS}, got "
                              f"{self.max_stop_strings}/{self.max_stop_chars}")
        for name in ("max_items_per_modality", "max_prompt_tokens", "max_model_len", "torch_threads", "max_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1 or unset, got {value}")
        if self.quantization_config is not None and self.quantization_config not in QUANTIZE_SHORTHANDS:
            raise ConfigError(f"quantization_config: expected one of {sorted(QUANTIZE_SHORTHANDS)}, "
                              f"got {self.quantization_config!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit "
                             f"({self.max_tokens_limit})")
        self.allowed_media_domains = tuple(d.lower().strip().rstrip(".") for d in self.allowed_media_domains)
        bad = [d for d in self.allowed_media_domains if not _DOMAIN.match(d)]
        if bad:
            raise ConfigError(f"allowed_media_domains: expected host names such as images.example.com (no scheme, "
                              f"path or wildcard), got {bad}")
        self.media_limits = MediaLimits(max_image_pixels=self.max_image_pixels,
                                        max_audio_seconds=self.max_audio_seconds)
        if self.served_model_name is None:
            self.served_model_name = str(self.model)
        from ..lora import open_adapters
        self.adapters = open_adapters(list(self.lora), field="lora")
        if self.served_model_name in self.adapters:
            raise ConfigError(f"lora: adapter name {self.served_model_name!r} is the served model's own name")
