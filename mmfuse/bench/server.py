"""``mmfuse bench server``: what the HTTP server costs over the offline engine, and how it scales.

  wire     decoding one 16 x 1024 float32 base64 item (``server.wire.decode_embedding``), and parsing
           a body holding it (``parse_json``): median and p99 of ``--wire-runs`` (target < 1 ms);
  offline  ``--requests`` requests (base64-free: token ids and arrays) submitted at once to the offline
           ``VLLMBackend`` in a process of its own, with the server's scheduler limits (``server_scheduler``):
           output tok/s, per-request p50/p99 latency, peak RSS;
  server   the same requests as ``/v1/completions`` bodies with base64 embeddings, all at once over
           HTTP to ``mmfuse serve --backend vllm`` (same engine settings): the same figures, the ratio
           to offline (targets: throughput >= 0.9 of offline, p50 overhead < 10%), every answer
           checked against the offline text of its own request;
  scaling  the same requests from 1, 4, 16, 64 concurrent clients (each sends its share one after
           another, ``serve_load.run_load``): requests/s, p50/p99, and the server's peak RSS (its
           process plus the engine core's, VmHWM).

Writes JSON and a PNG; ``--quick`` is a smoke run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .sides import add_side_args, parse_with_quick_defaults, subplots
from .machine import loadavg_text
from .workload import build_checkpoint, make_prompts

TARGETS = {"wire_ms": 1.0, "throughput_ratio": 0.9, "p50_overhead": 0.10}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mmfuse bench server", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 16 requests, clients 1,4,16")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 28, --quick 2)")
    ap.add_argument("--requests", type=int, default=None, help="requests (default 64, --quick 16)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 32, --quick 8)")
    ap.add_argument("--clients", default=None, help="concurrent clients to scale over (default 1,4,16,64)")
    ap.add_argument("--wire-runs", type=int, default=200, help="decodes timed in the wire micro-benchmark")
    ap.add_argument("--offline-core", choices=["inprocess", "process"], default="inprocess",
                    help="where the offline backend's engine core runs: in the caller's process (mmfuse's CPU "
                         "default) or in its own, as the server's does (vLLM's default)")
    add_side_args(ap, "server", ["offline"], max_model_len=1024)
    args = parse_with_quick_defaults(ap, argv, (("layers", 28, 2), ("requests", 64, 16), ("max_tokens", 32, 8),
                                                ("clients", "1,4,16,64", "1,4,16")))
    args.clients = [int(c) for c in str(args.clients).split(",")]
    return args


# -- wire decoding --------------------------------------------------------------------------------------------

def wire(runs: int) -> dict:
    """Median / p99 ms to decode one 16 x 1024 float32 base64 item, and to parse a body holding it."""
    from ..client import encode_embedding
    from ..server.wire import decode_embedding, parse_json

    value = encode_embedding(np.random.default_rng(0).standard_normal((16, 1024), dtype=np.float32))
    body = json.dumps({"model": "m", "prompt": "describe <|vision|>", "multimodal_embeddings": {"vision": [value]}})
    raw = body.encode()

    def times(fn) -> list[float]:
        fn()
        out = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            out.append(1000 * (time.perf_counter() - t))
        return sorted(out)

    dec, parse = times(lambda: decode_embedding("x", value)), times(lambda: parse_json(raw))
    pct = (lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))])
    return dict(item_shape=[16, 1024], body_bytes=len(raw), decode_p50_ms=pct(dec, 0.5), decode_p99_ms=pct(dec, 0.99),
                parse_p50_ms=pct(parse, 0.5), parse_p99_ms=pct(parse, 0.99),
                target_met=pct(dec, 0.5) + pct(parse, 0.5) < TARGETS["wire_ms"])


# -- the offline engine, in its own process --------------------------------------------------------------------

def server_scheduler() -> dict:
    """The scheduler limits of ``mmfuse serve``'s engine: vLLM's defaults for a server on this platform.

    vLLM sizes ``max_num_seqs`` and ``max_num_batched_tokens`` by usage context (on CPU: 256 sequences for
    ``vllm.LLM``, 128 for a server); the offline side gets the server's, so both schedule the same batches.
    An earlier run compared an offline engine admitting every request with a server capped at 32 sequences:
    the server's 64 requests ran in two waves of 32 and its p50 fell on the second wave (+93%).
    """
    from vllm.config import SchedulerConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    tokens, seqs = EngineArgs.get_batch_defaults(1)
    ctx = UsageContext.OPENAI_API_SERVER
    return {"max_num_seqs": seqs.get(ctx, SchedulerConfig.DEFAULT_MAX_NUM_SEQS),
            "max_num_batched_tokens": tokens.get(ctx, SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS)}


def requests(specs, cfg) -> list:
    return make_prompts(specs, cfg.requests, seed=77, items=2, words=24)


def offline_worker(cfg: argparse.Namespace) -> dict:
    from types import SimpleNamespace

    from vllm import SamplingParams

    from ..backends.vllm import to_completion
    from ..sampling import SamplingConfig
    from .sides import PluginSide, cpu_delta, cpu_seconds, peak_rss_mb, profiled, time_requests

    ckpt = build_checkpoint(cfg.workdir, cfg.layers)
    # read by offline_engine_core (a user's setting wins over mmfuse's in-process default)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.offline_core == "process" else "0"
    scheduler = server_scheduler()
    side = PluginSide(ckpt, ckpt, cfg.dtype, cfg.max_model_len, cfg.kv_cache_gb, **scheduler)
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0)
    encoded = [side.checkpoint.encode(p) for p in requests(side.checkpoint.specs, cfg)]
    time_requests(side, encoded[:2], params)  # warm-up
    side.llm.reset_prefix_cache()  # the timed run computes everything, as the server's will
    t, cpu = time.perf_counter(), cpu_seconds()
    res = profiled(lambda: time_requests(side, encoded, params), cfg.profile, "server-offline")
    wall = time.perf_counter() - t
    cpu = cpu_delta(cpu, cpu_seconds())
    texts = [to_completion(SimpleNamespace(token_ids=r["token_ids"], finish_reason=None, logprobs=None),
                           side.checkpoint.tokenizer, SamplingConfig(max_tokens=cfg.max_tokens)).text for r in res]
    rss = peak_rss_mb()
    side.close()
    return summary([r["latency_s"] for r in res], wall, sum(len(r["token_ids"]) for r in res)) | dict(
        texts=texts, peak_rss_mb=rss, scheduler=scheduler, cpu_s=cpu)


def summary(latencies: list[float], wall: float, out_tokens: int | None) -> dict:
    lat = sorted(latencies)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))])
    return dict(requests=len(lat), wall_s=wall, requests_per_s=len(lat) / wall, out_tokens=out_tokens,
                out_tok_s=out_tokens / wall if out_tokens is not None else None, p50_ms=1000 * pct(0.5),
                p99_ms=1000 * pct(0.99), loadavg=os.getloadavg(), latencies_ms=[1000 * x for x in lat])


# -- the server --------------------------------------------------------------------------------------------

def bodies(specs, cfg) -> list[tuple[str, dict]]:
    """The offline requests as ``/v1/completions`` bodies: the same text, items as base64 float32."""
    from .embeds import completion_body

    return [("/v1/completions", completion_body(p.text, p.items, cfg.max_tokens)) for p in requests(specs, cfg)]


async def _all_at_once(url: str, model: str, items: list[tuple[str, dict]]) -> tuple[list, list, float, int]:
    import httpx

    from .serve_load import KEY, wire_body

    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=600,
                                 limits=httpx.Limits(max_connections=len(items))) as http:
        async def one(path, body):
            t = time.perf_counter()
            r = await http.post(url + path, json=wire_body(body, model))
            r.raise_for_status()
            j = r.json()
            return time.perf_counter() - t, j["choices"][0]["text"], j["usage"]["completion_tokens"]

        start = time.perf_counter()
        out = await asyncio.gather(*(one(p, b) for p, b in items))
        wall = time.perf_counter() - start
    return [o[0] for o in out], [o[1] for o in out], wall, sum(o[2] for o in out)


def run_server(cfg, ckpt: Path, expected: list[str], log: Path) -> dict:
    import httpx

    from ..checkpoint import open_checkpoint
    from .serve_load import KEY, run_load, start_server
    from .sides import cpu_delta, cpu_seconds, peak_rss_mb

    items = bodies(open_checkpoint(ckpt).specs, cfg)
    queue = 4 * max(cfg.clients + [cfg.requests])  # never a 429: every request of the run is in flight at once
    server = start_server(ckpt, "--backend", "vllm", "--dtype", cfg.dtype, "--kv-cache-gb", str(cfg.kv_cache_gb),
                          "--max-model-len", str(cfg.max_model_len), "--max-queue", str(queue), log=log)
    try:
        model = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
        asyncio.run(_all_at_once(server.url, model, items[:2]))  # warm-up
        # CPU per process: the engine core, the server's API process, and this client, all on the same cores
        cpu = {"server": cpu_seconds(server.proc.pid), "client": cpu_seconds(descendants=False)}
        lat, texts, wall, out_tokens = asyncio.run(_all_at_once(server.url, model, items))
        cpu = cpu_delta(cpu["server"], cpu_seconds(server.proc.pid)) | {
            f"bench client ({k})": v for k, v in cpu_delta(cpu["client"], cpu_seconds(descendants=False)).items()}
        at_once = summary(lat, wall, out_tokens) | dict(
            mismatches=sum(a != b for a, b in zip(texts, expected)), cpu_s=cpu)
        scaling = []
        for c in cfg.clients:
            per = max(1, cfg.requests // c)
            r = asyncio.run(run_load(server.url, KEY, model, items, expected, c, per))
            scaling.append(r.summary() | {"peak_rss_mb": peak_rss_mb(server.proc.pid), "loadavg": os.getloadavg(),
                                          "first_errors": r.errors[:3]})
            print(f"  {c:3d} clients: {scaling[-1]['requests_per_s']:.2f} req/s, p50 {scaling[-1]['latency_p50_ms']} ms, "
                  f"p99 {scaling[-1]['latency_p99_ms']} ms, errors {scaling[-1]['errors']}; {loadavg_text()}", flush=True)
        rss = peak_rss_mb(server.proc.pid)
    finally:
        server.stop()
    return dict(at_once=at_once, scaling=scaling, peak_rss_mb=rss)


def _cpu_text(x: dict) -> str:
    busy = sorted(((v, k) for k, v in x["cpu_s"].items() if v >= 0.05), reverse=True)
    return f"wall {x['wall_s']:.1f} s: " + ", ".join(f"{k} {v:.1f}" for v, k in busy)


def table(r: dict) -> str:
    o, s = r["offline"], r["server"]["at_once"]
    w = r["wire"]
    lines = [f"Wire: one 16 x 1024 float32 base64 item decoded in {w['decode_p50_ms']:.3f} ms (p99 {w['decode_p99_ms']:.3f}), "
             f"its {w['body_bytes']:,}-byte body parsed in {w['parse_p50_ms']:.3f} ms (p99 {w['parse_p99_ms']:.3f}): "
             f"target < 1 ms {'met' if w['target_met'] else 'not met'}.", "",
             f"| {o['requests']} requests, all at once | output tok/s | p50 ms | p99 ms | peak RSS MB | load average |",
             "|---|---:|---:|---:|---:|---|"]
    core = r.get("offline_core", "inprocess")
    for name, x, rss in ((f"offline VLLMBackend (engine core {core})", o, o["peak_rss_mb"]), ("mmfuse serve (HTTP, base64)", s,
                                                                         r["server"]["peak_rss_mb"])):
        lines.append(f"| {name} | {x['out_tok_s']:.1f} | {x['p50_ms']:.0f} | {x['p99_ms']:.0f} | {rss:.0f} | "
                     f"{', '.join(f'{v:.2f}' for v in x['loadavg'])} |")
    sm = r["summary"]
    if "cpu_s" in o:
        lines += ["", "CPU seconds used during the run, by process (wall x cores is available): offline "
                  + _cpu_text(o) + "; server " + _cpu_text(s) + "."]
    if "scheduler" in o:
        lines += ["", "Both engines scheduled with " + ", ".join(f"{k}={v}" for k, v in o["scheduler"].items())
                  + " (vLLM's defaults for a server on this platform)."]
    lines += ["", f"server / offline throughput **{sm['throughput_ratio']:.2f}** (target >= 0.9: "
              f"{'met' if sm['throughput_ratio'] >= 0.9 else 'not met'}); p50 overhead **{100 * sm['p50_overhead']:.0f}%** "
              f"(target < 10%: {'met' if sm['p50_overhead'] < 0.1 else 'not met'}); answers differing from offline: "
              f"{s['mismatches']}.", "",
              "| clients | requests | errors | req/s | p50 ms | p99 ms | server peak RSS MB | load average |",
              "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in r["server"]["scaling"]:
        lines.append(f"| {x['clients']} | {x['requests']} | {x['errors']} | {x['requests_per_s']:.2f} | "
                     f"{x['latency_p50_ms']:.0f} | {x['latency_p99_ms']:.0f} | {x['peak_rss_mb']:.0f} | "
                     f"{', '.join(f'{v:.2f}' for v in x['loadavg'])} |")
    return "\n".join(lines)


def plot(r: dict):
    fig, ax = subplots(1, 3, figsize=(15, 4))
    o, s = r["offline"], r["server"]["at_once"]
    ax[0].bar(["offline", "server"], [o["out_tok_s"], s["out_tok_s"]], color=["tab:gray", "tab:blue"])
    ax[0].set(ylabel="output tok/s", title=f"{o['requests']} requests at once: {r['summary']['throughput_ratio']:.2f}x")
    # when each request finished: the schedule (waves show as steps), which p50/p99 alone hide
    for name, x, color in (("offline", o, "tab:gray"), ("server", s, "tab:blue")):
        lat = [v / 1000 for v in x["latencies_ms"]]
        ax[1].step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post", color=color,
                   label=f"{name}: p50 {x['p50_ms'] / 1000:.1f} s, p99 {x['p99_ms'] / 1000:.1f} s")
    ax[1].axhline(0.5, color="k", lw=0.5, ls=":")
    ax[1].set(xlabel="seconds from submission", ylabel="fraction of requests finished", title="per-request latency")
    ax[1].legend(fontsize=8)
    sc = r["server"]["scaling"]
    ax[2].plot([x["clients"] for x in sc], [x["requests_per_s"] for x in sc], "o-", label="req/s")
    ax2 = ax[2].twinx()
    ax2.plot([x["clients"] for x in sc], [x["latency_p99_ms"] for x in sc], "s--", color="tab:orange", label="p99 ms")
    ax[2].set(xscale="log", xlabel="concurrent clients", ylabel="requests/s", title="scaling")
    ax2.set_ylabel("p99 ms")
    return fig


def main(argv: list[str] | None = None) -> dict | None:
    """Wire micro-benchmark, offline vs server, scaling over clients; print tables, write JSON and a plot."""
    from .sides import bench_finish, bench_start, run_sides

    cfg = bench_start(argv, parse_args, offline_worker)
    if cfg is None:  # this process was the offline side's worker
        return None
    result = {"command": "mmfuse bench server " + " ".join(cfg.argv), "targets": TARGETS,
              "offline_core": cfg.offline_core, "loadavg": {"before": os.getloadavg()}, "wire": wire(cfg.wire_runs)}
    result |= run_sides("mmfuse.bench.server", ["offline"], cfg)
    print(f"  server ({loadavg_text()}):", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["server"] = run_server(cfg, cfg.checkpoint, result["offline"]["texts"], Path(tmp) / "server.log")
    cfg.bounds.sample("after server")
    o, s = result["offline"], result["server"]["at_once"]
    result["summary"] = dict(throughput_ratio=s["out_tok_s"] / o["out_tok_s"], p50_overhead=s["p50_ms"] / o["p50_ms"] - 1,
                             p99_overhead=s["p99_ms"] / o["p99_ms"] - 1)
    return bench_finish(result, cfg, plot, table)


if __name__ == "__main__":
    main()
