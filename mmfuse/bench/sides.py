"""Two ways to put vectors into a vLLM prompt, behind one small interface, for the peer benchmarks.

- ``PluginSide`` (mmfuse): token ids plus the raw items; the engine projects them (``to_request``).
- ``EmbedsSide`` (vLLM's own ``prompt_embeds``): the client projects the items and embeds the text
  (``embeds.PromptEmbedder``) and sends whole ``inputs_embeds``; the engine runs the plain base LM.

Both take the same ``EncodedPrompt`` and run with the same engine settings, so the difference in
what they measure is the transport. ``time_requests`` submits requests to an offline engine and
steps it itself, so every request's TTFT (first token) and latency (last token) is observed.
Each side runs in a process of its own (``run_worker``): an engine's memory and threads never mix
with the other's, and each process's peak RSS is the side's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

from ..inputs import EncodedPrompt, PreparedPrompt


class PluginSide:
    """The mmfuse plugin: ``VLLMBackend`` on the checkpoint."""

    name = "mmfuse"

    def __init__(self, ckpt: Path, base: Path, dtype: str, max_model_len: int, kv_cache_gb: float,
                 **engine_kwargs):
        from ..backends.vllm import VLLMBackend

        self.backend = VLLMBackend(ckpt, dtype=dtype, max_model_len=max_model_len, kv_cache_gb=kv_cache_gb,
                                   **engine_kwargs)
        self.llm = self.backend.llm
        self.checkpoint = self.backend.checkpoint

    def request(self, encoded: EncodedPrompt) -> dict:
        from ..backends.vllm import to_request

        return to_request(encoded)

    def offline_bytes(self, encoded: EncodedPrompt) -> int:
        from .embeds import mmfuse_item_bytes

        return mmfuse_item_bytes(encoded)

    def server_bytes(self, prepared: PreparedPrompt, max_tokens: int) -> int:
        from .embeds import mmfuse_body_bytes

        return mmfuse_body_bytes(prepared.text, prepared.items, max_tokens)

    def close(self) -> None:
        self.backend.close()


class EmbedsSide:
    """vLLM's ``prompt_embeds`` on the base LM (the checkpoint's LM weights), rows built by the client."""

    name = "prompt_embeds"

    def __init__(self, ckpt: Path, base: Path, dtype: str, max_model_len: int, kv_cache_gb: float):
        import torch
        from vllm import LLM

        from ..backends.vllm import engine_args
        from ..backends.vllm_defaults import EngineOptions, apply_process_defaults, offline_engine_core
        from .embeds import PromptEmbedder

        self.embedder = PromptEmbedder(ckpt, getattr(torch, dtype))
        self.checkpoint = self.embedder.checkpoint
        apply_process_defaults(1)
        options = EngineOptions(dtype=dtype, max_model_len=max_model_len, kv_cache_gb=kv_cache_gb)
        # the same engine settings as the plugin's (engine_args), on the base LM, with prompt_embeds on
        args = engine_args(self.checkpoint, options, model=str(base), enable_prompt_embeds=True)
        with offline_engine_core(1):
            self.llm = LLM(**args)

    def request(self, encoded: EncodedPrompt) -> dict:
        return {"prompt_embeds": self.embedder(encoded)}

    def offline_bytes(self, encoded: EncodedPrompt) -> int:
        from .embeds import tensor_bytes

        return tensor_bytes(self.embedder(encoded))

    def server_bytes(self, prepared: PreparedPrompt, max_tokens: int) -> int:
        from .embeds import server_body_bytes

        return server_body_bytes(self.embedder(self.checkpoint.encode(prepared)), max_tokens)

    def close(self) -> None:
        # the only engine of its worker process (run_worker), so shutting its core down cannot pull vLLM's
        # process-wide state from under another in-process engine (VLLMBackend.close guards that case)
        self.llm.llm_engine.engine_core.shutdown()


SIDES = {"mmfuse": PluginSide, "prompt_embeds": EmbedsSide}


def time_requests(side, prompts: list[EncodedPrompt], params) -> list[dict]:
    """Submit every prompt at once (building each request is timed, as a client would pay it) and step the
    engine to the end. Per request: ``ttft_s`` and ``latency_s`` from the start of the call, the generated
    ``token_ids`` and vLLM's ``num_cached_tokens`` (prompt tokens served from the prefix cache)."""
    engine = side.llm.llm_engine
    start = time.perf_counter()
    ids = []
    for p in prompts:
        (engine_input,) = engine.renderer.render_cmpl([side.request(p)])
        ids.append(uuid.uuid4().hex)
        engine.add_request(ids[-1], engine_input, params)
    out: dict[str, dict] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            now = time.perf_counter() - start
            rec = out.setdefault(o.request_id, {"ttft_s": now})
            if o.finished:
                c = o.outputs[0]
                rec.update(latency_s=now, token_ids=list(c.token_ids), num_cached_tokens=o.num_cached_tokens or 0,
                           logprobs=[step[t].logprob for t, step in zip(c.token_ids, c.logprobs)] if c.logprobs else None)
    return [out[i] for i in ids]


def process_tree(pid: int | None = None) -> list[int]:
    """A process (default: this one) and its live descendants (Linux ``/proc``; just the process elsewhere)."""
    out, todo = [], [pid or os.getpid()]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def cpu_seconds(pid: int | None = None, descendants: bool = True) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each process of ``pid``'s tree (or ``pid`` alone), keyed
    'NAME PID': where the cores went, e.g. a server's API process beside its engine core."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for p in process_tree(pid) if descendants else [pid or os.getpid()]:
        try:
            name = Path(f"/proc/{p}/comm").read_text().strip()
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{name} {p}"] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (stat fields 14, 15)
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each process used between two ``cpu_seconds`` readings."""
    return {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident memory (VmHWM) of a process (default: this one) plus all its live descendants, summed, MB:
    an engine core in its own process counts with its caller. Call it before the engine shuts down."""
    total = 0.0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:  # gone meanwhile, or no /proc (not Linux): this process's own peak at least
            if p == os.getpid():
                total += resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return total


def profiled(fn, profile_dir: Path | None, name: str):
    """``fn()``, under cProfile when ``profile_dir`` is given: stats to DIR/NAME.prof and the top 40 by cumulative
    time to DIR/NAME.txt (the in-process engine core runs in this thread, so the model's forward is in it).
    Workers wrap only their measurements in it, not the engine start."""
    if profile_dir is None:
        return fn()
    path = profile_dir / f"{name}.prof"
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    try:
        return prof.runcall(fn)
    finally:
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.dump_stats(path)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
        path.with_suffix(".txt").write_text(text.getvalue())


def add_side_args(ap: argparse.ArgumentParser, name: str, workers: list[str], max_model_len: int) -> None:
    """The arguments ``peer``, ``prefix`` and ``server`` share: engine size, where results go (``docs/bench_NAME``),
    profiling, device, and the hidden ``--worker`` flags ``run_worker`` passes to each side's process."""
    from .device import add_device_arg

    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--max-model-len", type=int, default=max_model_len)
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("MMFUSE_BENCH_DIR", "/tmp/mmfuse-bench")))
    ap.add_argument("--json", type=Path, default=Path(f"docs/bench_{name}.json"))
    ap.add_argument("--plot", type=Path, default=Path(f"docs/bench_{name}.png"))
    ap.add_argument("--profile", type=Path, default=None,
                    help="write a cProfile of each engine process here (DIR/NAME-SIDE.prof and .txt): where the time goes")
    add_device_arg(ap)
    ap.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)


def parse_with_quick_defaults(ap: argparse.ArgumentParser, argv: list[str] | None,
                              defaults: tuple[tuple[str, object, object], ...]) -> argparse.Namespace:
    """Parse; each (name, full, quick) left unset gets its full-run or ``--quick`` value."""
    args = ap.parse_args(argv)
    for name, full, quick in defaults:
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def run_worker(module: str, side: str, argv: list[str], out: Path) -> dict:
    """``python -m MODULE ARGV --worker SIDE --worker-out OUT`` in a fresh process; its JSON result."""
    cmd = [sys.executable, "-m", module, *argv, "--worker", side, "--worker-out", str(out)]
    print(f"  {side}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def run_sides(module: str, sides: list[str], cfg) -> dict[str, dict]:
    """Each side's worker process in turn (``run_worker``), the machine's bounds sampled after each: side -> its
    result."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            out[side] = run_worker(module, side, cfg.argv, Path(tmp) / f"{side}.json")
            cfg.bounds.sample(f"after {side}")
    return out


def bench_start(argv: list[str] | None, parse_args, worker):
    """The common start of ``peer``, ``prefix`` and ``server``: parse, check the device, then either run as a
    side's worker process (its result written to ``--worker-out``; returns None) or build the model once, before
    any side's process starts, and return the parent's config (``cfg.checkpoint``: the model's directory;
    ``cfg.bounds``: the machine's bounds, sampled at the start and after each part)."""
    from .device import check_device
    from .machine import Bounds, loadavg_text
    from .workload import build_checkpoint

    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    cfg.argv = argv
    cfg.dtype = check_device(cfg.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.worker:
        cfg.worker_out.write_text(json.dumps(worker(cfg)))
        return None
    print(f"building/reusing the model in {cfg.workdir} ({cfg.layers} layers); {loadavg_text()}", flush=True)
    cfg.checkpoint = build_checkpoint(cfg.workdir, cfg.layers)
    cfg.bounds = Bounds(quick=cfg.quick, device=cfg.device)
    cfg.bounds.sample("start")
    return cfg


def subplots(*args, **kwargs):
    """matplotlib's ``subplots`` on its file-only Agg backend (benchmarks run headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def bench_finish(result: dict, cfg, plot, table) -> dict:
    """The common end: the load average after, the bounds, JSON, the figure ``plot(result)`` draws (titled with
    the command and load average) and the table."""
    result["loadavg"]["after"] = os.getloadavg()
    result["bounds"] = cfg.bounds.to_dict()
    for path in (cfg.json, cfg.plot):
        path.parent.mkdir(parents=True, exist_ok=True)
    cfg.json.write_text(json.dumps(result, indent=1))
    fig = plot(result)
    title = f"{result['command']}   (load average {', '.join(f'{x:.2f}' for x in result['loadavg']['after'])})"
    fig.suptitle(textwrap.fill(title, int(14 * fig.get_figwidth())), fontsize=9)  # ~14 characters per inch at 9 pt
    fig.tight_layout()
    fig.savefig(cfg.plot, dpi=110)
    print(table(result) + "\n\n" + cfg.bounds.text(), flush=True)
    print(f"-> {cfg.json}, {cfg.plot}", flush=True)
    return result
