"""``python -m mmfuse.bench.serve_load``: many concurrent clients against ``mmfuse serve`` on loopback.

Each client sends its requests one after another; every answer is checked
against the expected text for *its own* request (distinct vectors give distinct
answers), so a lost, failed or crossed answer counts as an error. Requests mix
chat (base64 embedding parts) and completions (JSON-array embeddings), streamed
and not, all greedy. Expected texts come from a sequential pass over the same
server before the load starts (the tests use the offline pipeline instead).

    python -m mmfuse.bench.serve_load                      # tiny checkpoint, HF backend, 32 x 200
    python -m mmfuse.bench.serve_load --ckpt DIR --backend vllm --clients 32 --requests 200
    python -m mmfuse.bench.serve_load --url http://127.0.0.1:8000 --api-key KEY
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..client import embedding_part

KEY = "sk-load"


# -- a server in a subprocess -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """``python -m mmfuse.server`` on loopback; ``url`` is its base, ``log`` its output file."""

    proc: subprocess.Popen
    url: str
    log: Path

    def wait_ready(self, timeout: float = 300) -> "ServerProcess":
        """Wait for ``/health``; raises with the server's log if it exits or does not come up."""
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError(f"server did not answer /health in {timeout}s:\n{self.log.read_text()[-4000:]}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit status (0 after a graceful shutdown)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


def launch_server(ckpt, *args: str, log: Path, api_key: str = KEY) -> ServerProcess:
    """Start a server without waiting for it (``wait_ready`` does)."""
    port = free_port()
    # vLLM's CPU settings are the server's own defaults (mmfuse.backends.vllm_defaults)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "mmfuse.server", str(ckpt), "--port", str(port), "--api-key", api_key, *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(proc, f"http://127.0.0.1:{port}", log)


def start_server(ckpt, *args: str, log: Path, api_key: str = KEY, timeout: float = 300) -> ServerProcess:
    return launch_server(ckpt, *args, log=log, api_key=api_key).wait_ready(timeout)


# -- workload -----------------------------------------------------------------------------------------------

def make_bodies(dims: dict[str, int], count: int, max_tokens: int, seed: int = 0) -> list[tuple[str, dict]]:
    """``count`` distinct greedy requests as (path, JSON body without ``model``), with raw arrays for offline use.

    Bodies carry wire encodings; ``body["_items"]`` keeps the float32 arrays (removed before sending).
    """
    rng = np.random.default_rng(seed)
    (m1, d1), *rest = dims.items()
    out = []
    for i in range(count):
        a = rng.standard_normal((1 + i % 3, d1)).astype(np.float32)
        common = {"max_tokens": max_tokens, "temperature": 0, "stream": i % 4 == 3}
        if i % 2 == 0:
            content = [{"type": "text", "text": f"request {i}: describe "}, embedding_part(a, m1)]
            body = {"messages": [{"role": "user", "content": content}], **common}
            out.append(("/v1/chat/completions", body | {"_items": {m1: [a]}}))
        else:
            items, raw = {m1: [a.tolist()]}, {m1: [a]}
            if rest:
                m2, d2 = rest[0]
                b = rng.standard_normal(d2).astype(np.float32)
                items[m2], raw[m2] = [b.tolist()], [b]
            # no placeholder in the prompt: the items go before the text
            body = {"prompt": f"request {i}: compare", "multimodal_embeddings": items, **common}
            out.append(("/v1/completions", body | {"_items": raw}))
    return out


def wire_body(body: dict, model: str) -> dict:
    return {k: v for k, v in body.items() if k != "_items"} | {"model": model}


async def _ask(http, url: str, path: str, body: dict) -> str:
    """The answer text (choice 0) of one request, streamed or not; raises on any HTTP or protocol error."""
    if not body.get("stream"):
        r = await http.post(url + path, json=body)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"]
    text, done = [], False
    async with http.stream("POST", url + path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for c in chunk["choices"]:
                text.append((c["delta"].get("content") or "") if "delta" in c else c["text"])
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return "".join(text)


@dataclass
class LoadResult:
    clients: int
    requests_per_client: int
    ok: int = 0
    errors: list[str] = field(default_factory=list)  # HTTP/protocol failures and wrong answers
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan"))
        return {"clients": self.clients, "requests_per_client": self.requests_per_client,
                "requests": self.clients * self.requests_per_client, "ok": self.ok, "errors": len(self.errors),
                "wall_s": round(self.wall_s, 2), "requests_per_s": round(self.ok / self.wall_s, 2),
                "latency_p50_ms": round(pct(0.50) * 1000, 1), "latency_p99_ms": round(pct(0.99) * 1000, 1),
                "latency_mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else None}


async def run_load(url: str, api_key: str, model: str, bodies: list[tuple[str, dict]], expected: list[str],
                   clients: int, per_client: int) -> LoadResult:
    """``clients`` concurrent clients x ``per_client`` requests, request j of client c = body (c*per_client+j) % len."""
    import httpx

    result = LoadResult(clients, per_client)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=600) as http:
        async def client(c: int) -> None:
            for j in range(per_client):
                k = (c * per_client + j) % len(bodies)
                path, body = bodies[k]
                t = time.perf_counter()
                try:
                    text = await _ask(http, url, path, wire_body(body, model))
                except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
                    result.errors.append(f"client {c} request {j} (body {k}): {type(e).__name__}: {e}")
                    continue
                result.latencies_s.append(time.perf_counter() - t)
                if text != expected[k]:
                    result.errors.append(f"client {c} request {j} (body {k}): got {text!r}, expected {expected[k]!r}")
                else:
                    result.ok += 1

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        result.wall_s = time.perf_counter() - start
    return result


async def reference(url: str, api_key: str, model: str, bodies: list[tuple[str, dict]]) -> list[str]:
    """Expected answers: each body once, one at a time (no batching with other requests)."""
    import httpx

    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=600) as http:
        return [await _ask(http, url, path, wire_body(body, model)) for path, body in bodies]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmfuse.bench.serve_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (else one is started on --ckpt)")
    p.add_argument("--api-key", default=KEY)
    p.add_argument("--ckpt", help="checkpoint to serve (default: a tiny Qwen3 one built under --work)")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=200, help="per client")
    p.add_argument("--distinct", type=int, default=64, help="distinct request bodies")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--server-args", default="", help="more `mmfuse serve` options, e.g. '--torch-threads 1'")
    p.add_argument("--work", default="/tmp/mmfuse-serve-load")
    p.add_argument("--out", default=None, help="JSON result file (default WORK/result.json)")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    server = None
    if args.url is None:
        ckpt = args.ckpt or _tiny_checkpoint(work)
        server = start_server(ckpt, "--backend", args.backend, "--max-queue", str(4 * args.clients),
                              *shlex.split(args.server_args), log=work / "server.log", api_key=args.api_key)
        url = server.url
    else:
        url = args.url.rstrip("/")
    try:
        import httpx
        card = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {args.api_key}"}).json()["data"][0]
        dims = {m["name"]: m["input_dim"] for m in card["modalities"]}
        bodies = make_bodies(dims, args.distinct, args.max_tokens)
        expected = asyncio.run(reference(url, args.api_key, card["id"], bodies))
        result = asyncio.run(run_load(url, args.api_key, card["id"], bodies, expected, args.clients, args.requests))
    finally:
        exit_code = server.stop() if server else None
    summary = result.summary() | {
        "backend": card["backend"], "max_tokens": args.max_tokens, "distinct_bodies": args.distinct,
        "distinct_expected": len(set(expected)), "server_exit_code": exit_code,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": "python -m mmfuse.bench.serve_load " + shlex.join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out or work / "result.json")
    out.write_text(json.dumps(summary | {"first_errors": result.errors[:20]}, indent=2))
    print(json.dumps(summary, indent=2))
    for e in result.errors[:5]:
        print("ERROR", e, file=sys.stderr)
    return 1 if result.errors else 0


def _tiny_checkpoint(work: Path) -> Path:
    """The tests' tiny Qwen3 checkpoint (m1: 32-d mlp2x_gelu; m2: 16-d linear, 2 tokens per vector)."""
    from ..checkpoint import init_checkpoint
    from ..config import ModalitySpec
    from ..tiny import make_base

    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        base = make_base(work / "base", family="qwen3", seed=0)
        specs = [ModalitySpec(name="m1", input_dim=32),
                 ModalitySpec(name="m2", input_dim=16, projector="linear", tokens_per_item=2,
                              placeholder="<|sensor|>", max_items=4)]
        init_checkpoint(base, ckpt, specs, seed=0)
    return ckpt


if __name__ == "__main__":
    sys.exit(main())
