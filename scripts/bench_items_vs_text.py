"""Target (c) re-measured on its own: vLLM with items vs the same prompts as plain tokens, 5 alternating
reps of 16 requests x 32 tokens on the 28-layer Qwen3-0.6B-shaped model built by `mmfuse bench throughput`,
then a cProfile of the front end (parsing, validation, hashing, PromptReplacement) for one batch with items.
Run: python scripts/bench_items_vs_text.py
"""
import cProfile
import io
import pstats
import time

from vllm import SamplingParams
from mmfuse.bench.workload import make_prompts
from mmfuse.backends.vllm import VLLMBackend, to_request

if __name__ == "__main__":
    be = VLLMBackend("/tmp/mmfuse-bench/mmfuse-qwen3-0.6b-shape-L28", max_model_len=512, kv_cache_gb=2)
    pids = set(be.checkpoint.placeholder_ids.values())
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    be.llm.generate([to_request(be.encode(p)) for p in make_prompts(be.specs, 2, 1, items=4, words=8)], params, use_tqdm=False)
    runs = {"items": [], "text": []}
    for rep in range(5):
        for kind in ("text", "items"):
            ps = make_prompts(be.specs, 16, 900 + 10 * rep + (kind == "items"), items=4, words=24)
            if kind == "items":
                t = time.perf_counter(); reqs = [to_request(be.encode(p)) for p in ps]; prep = time.perf_counter() - t
            else:
                t = time.perf_counter(); reqs = [{"prompt_token_ids": [x if x not in pids else 300 + j % 100 for j, x in enumerate(be.encode(p).expanded_ids)]} for p in ps]; prep = time.perf_counter() - t
            t = time.perf_counter(); be.llm.generate(reqs, params, use_tqdm=False); gen = time.perf_counter() - t
            runs[kind].append(16 * 32 / (prep + gen))
            print(kind, f"prep {prep*1000:.1f} ms, generate {gen:.2f} s, {16*32/(prep+gen):.2f} tok/s", flush=True)
    ri = sum(runs["items"]) / 5; rt = sum(runs["text"]) / 5
    print(f"items {ri:.2f} tok/s, text {rt:.2f} tok/s, ratio {ri/rt:.3f}", flush=True)
    # front-end profile of one items run (main process: parse, validate, hash, PromptReplacement)
    ps = make_prompts(be.specs, 16, 7777, items=4, words=24)
    pr = cProfile.Profile(); pr.enable()
    be.llm.generate([to_request(be.encode(p)) for p in ps], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    pr.disable(); s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(25); print(s.getvalue()[:6000])
    be.close()
