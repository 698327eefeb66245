"""Working vLLM settings for the machine mmfuse runs on, wherever the user set none.

vLLM's own defaults fail in two common places, both seen on a 2-core CPU box:

- memory: on CPU vLLM reserves ``gpu_memory_utilization`` (0.92) of *total* memory and
  refuses to start when less is free ("Available memory on node 0 ... is less than
  desired CPU memory utilization"). mmfuse asks for an explicit KV cache instead, sized
  from free memory (``default_cpu_kv_cache_bytes``), unless the user gave
  ``kv_cache_gb``, ``gpu_memory_utilization`` or ``VLLM_CPU_KVCACHE_SPACE``.
- processes: the CPU platform forces the ``spawn`` start method, so the engine-core child
  re-imports the caller's main script; an unguarded script (no ``if __name__ ==
  "__main__":``) then starts a second engine and dies. So on CPU the offline engine core
  (``vllm.LLM``, one rank) runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): measured
  side by side (``mmfuse bench engine-core``, BENCHMARKS.md) it generates as fast as the
  multi-process engine and starts 4-5x sooner. The server's ``AsyncLLM`` and
  parallel engines (more than one rank) keep their own processes.

Threads: vLLM on CPU keeps one core for its front end unless told otherwise; mmfuse
binds the engine's OpenMP threads to every core this process may use, split between
ranks (tensor x pipeline parallel), for each engine it starts.
"""
from __future__ import annotations

import ast
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..config import ConfigError

GiB = 2**30
EXECUTORS = (None, "mp", "ray")  # vLLM's executors for parallel ranks that mmfuse passes through
# KV cache on CPU when nothing is set: a quarter of free memory, within these bounds
CPU_KV_MIN, CPU_KV_MAX = GiB // 2, 4 * GiB


@dataclass
class EngineOptions:
    """The engine settings mmfuse exposes on every command and in the Python API."""

    dtype: str = "float32"  # exact parity with the transformers backend; bf16 is faster where supported
    max_model_len: int | None = None  # None = the model's own
    kv_cache_gb: float | None = None  # KV cache size; None = from free memory on CPU, vLLM's default on GPU
    gpu_memory_utilization: float | None = None  # vLLM's fraction of device memory (of RAM on CPU)
    tensor_parallel_size: int = 1  # ranks sharding each layer (vLLM shards the LM; projectors are replicated)
    pipeline_parallel_size: int = 1  # ranks holding consecutive layers (the projectors run on the first)
    # how ranks are started: "mp" (processes on this node; vLLM's default) or "ray" (a Ray cluster, across nodes)
    distributed_executor_backend: str | None = None

    def __post_init__(self) -> None:
        if self.kv_cache_gb is not None and self.gpu_memory_utilization is not None:
            raise ConfigError("give kv_cache_gb or gpu_memory_utilization, not both")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ConfigError(f"kv_cache_gb: expected a positive number of GiB, got {self.kv_cache_gb!r}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization: expected a fraction in (0, 1], got "
                              f"{self.gpu_memory_utilization!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len: expected at least 2, got {self.max_model_len!r}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")

        if self.distributed_executor_backend not in EXECUTORS:
            raise ConfigError(f"distributed_executor_backend: expected one of {EXECUTORS[1:]} or unset, got "
                              f"{self.distributed_executor_backend!r}")

    @property
    def world_size(self) -> int:
        """Ranks, hence worker processes, of the engine on this node."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def memory_args(self, cpu: bool) -> dict:
        """Engine arguments that size the KV cache."""
        if self.kv_cache_gb is not None:
            return {"kv_cache_memory_bytes": int(self.kv_cache_gb * GiB)}
        if self.gpu_memory_utilization is not None:
            return {"gpu_memory_utilization": self.gpu_memory_utilization}
        if cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            return {"kv_cache_memory_bytes": default_cpu_kv_cache_bytes()}
        return {}


def default_cpu_kv_cache_bytes() -> int:
    """A quarter of the memory free now, between 0.5 and 4 GiB, in whole MiB."""
    import psutil

    quarter = psutil.virtual_memory().available // 4
    return min(CPU_KV_MAX, max(CPU_KV_MIN, quarter)) // 2**20 * 2**20


def check_can_spawn(world_size: int) -> None:
    """An engine with its own processes (one per tensor/pipeline-parallel rank) spawns them, and each
    re-imports the main script: refuse early, with the fix, when that script has no
    ``if __name__ == "__main__":`` block."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if world_size == 1 or not path or not os.path.isfile(path):
        return  # one rank in-process, or a REPL / notebook / `python -c`: nothing is re-imported
    try:
        with open(path, encoding="utf-8") as f:
            body = ast.parse(f.read(), path).body
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    if not any(isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) for node in body):
        raise ConfigError(f"tensor_parallel_size x pipeline_parallel_size = {world_size} ranks start one vLLM "
                          f"process per rank, and each re-imports {path}: put the code that opens the pipeline "
                          f"under `if __name__ == \"__main__\":`")


def cpu_binding(ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` ranks (tensor x pipeline parallel): this process's CPUs split
    into equal, disjoint sets, ``|`` between ranks (e.g. ``"0,1"`` or ``"0|1"``)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if ranks > len(cpus):
        raise ConfigError(f"tensor_parallel_size x pipeline_parallel_size = {ranks} ranks need at least one CPU per "
                          f"rank, this process has {len(cpus)}")
    per = len(cpus) // ranks
    return "|".join(",".join(map(str, cpus[r * per:(r + 1) * per])) for r in range(ranks))


_BIND = "VLLM_CPU_OMP_THREADS_BIND"
_our_binding: list[str] = []  # the binding mmfuse last set in this process, if any


def apply_process_defaults(world_size: int = 1) -> None:
    """Set vLLM's environment defaults in this process (children inherit them); user settings win.

    The core binding is per engine: vLLM needs one CPU set per rank, so a binding mmfuse set for an
    earlier engine of another size (e.g. ``"0,1"`` for one rank) is replaced; a user's is kept."""
    from ..logs import quiet_engine

    quiet_engine()  # before vLLM's first import: its loggers read the environment then
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        if os.environ.get(_BIND) is None or os.environ[_BIND] in _our_binding:
            os.environ[_BIND] = cpu_binding(world_size)
            _our_binding[:] = [os.environ[_BIND]]
    # An engine core started in this process (the in-process offline core) freezes vLLM's reads of its
    # environment variables (vllm.envs.enable_envs_cache); a later engine must see the values set for it
    # (its binding, VLLM_ENABLE_V1_MULTIPROCESSING), as vLLM's own cleanup between engines ensures.
    import vllm.envs

    vllm.envs.disable_envs_cache()


@contextmanager
def offline_engine_core(world_size: int = 1) -> Iterator[str]:
    """Around the construction of a ``vllm.LLM``: on CPU with one rank, its engine core in-process
    unless the user set ``VLLM_ENABLE_V1_MULTIPROCESSING``. Yields where the core runs, for the status
    line. Scoped to the construction (vLLM reads the variable only then), so a server or a
    parallel engine started later in this process keeps its own processes."""
    from vllm.platforms import current_platform

    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    ours = key not in os.environ and current_platform.is_cpu() and world_size == 1
    if ours:
        os.environ[key] = "0"
    try:
        yield "in-process" if os.environ.get(key) == "0" else "own process"
    finally:
        if ours:
            del os.environ[key]
