"""Benchmark logic that is not timing: the CPU peak from /proc/cpuinfo text, bound fractions, the peer's
client-side ``prompt_embeds`` rows, and the transformers attention option the fair baseline uses."""
import pytest
import torch

from mmfuse import SamplingConfig
from mmfuse.bench.machine import Bounds, MachineLimits, cpu_peak, fraction
from mmfuse.inputs import prepare


def cpuinfo(vendor: str, family: int, flags: str, mhz: float, cores: list[tuple[int, int]]) -> str:
    """A /proc/cpuinfo text: one block per logical CPU, (physical id, core id) each."""
    return "\n\n".join(f"processor\t: {i}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel name\t: X\n"
                       f"cpu MHz\t\t: {mhz}\nphysical id\t: {p}\ncore id\t\t: {c}\nflags\t\t: {flags}"
                       for i, (p, c) in enumerate(cores)) + "\n"


def test_peak_intel_avx512_counts_physical_cores_not_hyperthreads():
    text = cpuinfo("GenuineIntel", 6, "fpu sse2 avx avx2 fma avx512f", 2900.0, [(0, 0), (0, 0), (0, 1), (0, 1)])
    peak = cpu_peak(text)
    assert (peak.cores, peak.flops_per_cycle) == (2, 64)
    assert peak.gflops == pytest.approx(2 * 2.9 * 64)


def test_peak_amd_zen4_runs_avx512_at_the_avx2_rate_and_zen5_does_not():
    zen4 = cpuinfo("AuthenticAMD", 25, "avx avx2 fma avx512f avx512_bf16", 2596.1, [(0, 0), (0, 1)])
    assert cpu_peak(zen4).flops_per_cycle == 32
    assert cpu_peak(zen4).gflops == pytest.approx(2 * 2.5961 * 32)
    zen5 = cpuinfo("AuthenticAMD", 26, "avx avx2 fma avx512f", 3000.0, [(0, 0)])
    assert cpu_peak(zen5).flops_per_cycle == 64


def test_peak_without_avx512_and_with_an_explicit_max_clock():
    avx2 = cpuinfo("GenuineIntel", 6, "sse2 avx avx2 fma", 2000.0, [(0, 0)])
    assert cpu_peak(avx2, max_mhz=3500.0).gflops == pytest.approx(3.5 * 32)
    assert cpu_peak(cpuinfo("GenuineIntel", 6, "sse2 avx", 2000.0, [(0, 0)])).flops_per_cycle == 16
    assert cpu_peak(cpuinfo("GenuineIntel", 6, "sse2", 2000.0, [(0, 0)])).flops_per_cycle == 8


def test_a_fraction_above_one_is_a_measurement_error():
    assert fraction(1.38, 1.0)["measurement_error"]
    assert not fraction(0.6, 1.0)["measurement_error"]


def test_bounds_keep_the_maximum_of_every_sample_and_kernel():
    b = Bounds.__new__(Bounds)  # no measuring: the bookkeeping only
    b.samples, b.peak = [], None
    b.samples.append(("before", MachineLimits(50, 10, 12, 2, "x", 2, {"torch.mm": 50, "onednn": 40})))
    b.samples.append(("after", MachineLimits(70, 8, 13, 2, "x", 2, {"torch.mm": 45, "onednn": 70})))
    best = b.best
    assert (best.gemm_gflops, best.copy_gbps, best.read_gbps) == (70, 10, 13)
    assert best.gemm_by_kernel == {"torch.mm": 50, "onednn": 70}


PROMPTS = [("a <|m1|> b <|sensor|> c <|m1|> d", {"m1": [torch.randn(32), torch.randn(3, 32)], "m2": [torch.randn(2, 16)]}),
           ("describe these", {"m1": [torch.randn(32)]})]


def test_prompt_embedder_rows_equal_the_backends_rows(qwen3_ckpt, qwen3_model):
    """The peer's client-side inputs_embeds are the rows the transformers backend feeds its LM."""
    from mmfuse.bench.embeds import PromptEmbedder

    client = PromptEmbedder(qwen3_ckpt)
    for text, items in PROMPTS:
        encoded = client.encode(prepare(text, items, client.specs))
        ids = torch.tensor([encoded.expanded_ids])
        with torch.inference_mode():
            expected = qwen3_model.embed(ids, encoded.items)[0]
        assert torch.equal(client(encoded), expected)


def test_sdpa_attention_gives_the_eager_greedy_tokens(qwen3_ckpt):
    """The fair baseline runs sdpa; it must compute what the eager reference does (batched, left padding)."""
    from mmfuse.backends.hf import HFBackend

    eager, sdpa = HFBackend(qwen3_ckpt, device="cpu"), HFBackend(qwen3_ckpt, device="cpu", attn_implementation="sdpa")
    prompts = [eager.encode(prepare(t, i, eager.specs)) for t, i in PROMPTS]
    sampling = SamplingConfig(max_tokens=12)
    assert [c[0].token_ids for c in sdpa.generate(prompts, sampling)] == \
        [c[0].token_ids for c in eager.generate(prompts, sampling)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_cuda_without_a_gpu_stops_with_the_reason():
    from mmfuse.bench.device import check_device

    assert check_device("cpu") == "float32"
    with pytest.raises(SystemExit, match="no CUDA GPU is visible"):
        check_device("cuda")


def test_measured_clock_is_a_plausible_all_core_clock_and_names_its_source():
    # The chain must not be folded away by the compiler (that would read as a 100x clock) nor be
    # mistimed: every CPU this runs on clocks between 0.5 and 7 GHz.
    from mmfuse.bench import clock
    from mmfuse.bench.machine import this_cpu_peak

    mhz = clock.measured_mhz(cores=1, trips=200_000, repeats=2)
    if mhz is None:
        pytest.skip("no C compiler: the peak falls back to cpuinfo's clock")
    assert 500 < mhz < 7000
    assert this_cpu_peak().clock_source.startswith("measured")


def test_a_given_clock_replaces_cpuinfos_and_is_named():
    zen4 = cpuinfo("AuthenticAMD", 25, "avx avx2 fma avx512f", 2596.1, [(0, 0), (0, 1)])
    assert cpu_peak(zen4).clock_source == "cpuinfo 'cpu MHz'"
    peak = cpu_peak(zen4, max_mhz=3650.0, clock_source="measured")
    assert (peak.gflops, peak.clock_source) == (pytest.approx(2 * 3.65 * 32), "measured")


def test_cpu_seconds_counts_each_process_of_the_tree_by_name():
    import os
    import subprocess
    import sys
    import time

    from mmfuse.bench.sides import cpu_delta, cpu_seconds

    def comm(pid: int) -> str:
        return open(f"/proc/{pid}/comm").read().strip()

    before = cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.5: pass\ninput()"], stdin=subprocess.PIPE)
    try:
        key, deadline = f"{comm(child.pid)} {child.pid}", time.time() + 30
        while cpu_seconds(child.pid, descendants=False).get(key, 0) < 0.45:
            assert time.time() < deadline
        assert cpu_delta(before, cpu_seconds())[key] >= 0.45  # the child's busy half-second, under its own name
        assert list(cpu_seconds(descendants=False)) == [f"{comm(os.getpid())} {os.getpid()}"]
    finally:
        child.communicate(b"\n")
