"""The machine's own limits, measured with torch in the benchmark's process, and the bounds they imply.

- fp32 GEMM GFLOP/s: a prefill-shaped product ([2048, 1024] x [1024, 3072]) through every fp32 kernel
  either backend may use: ``torch.mm`` (transformers), torch's oneDNN (mkldnn) linear, and vLLM's own
  CPU linear (``vllm._custom_ops.onednn_mm``, what ``dispatch_cpu_unquantized_gemm`` picks for fp32
  weights). The bound is the fastest of them: a bound measured with a slower kernel than the one a
  backend runs is no bound (vLLM's prefill once came out at 1.38 "of the GEMM bound").
- copy bandwidth GB/s: ``dst.copy_(src)`` over 512 MiB, counting bytes read plus bytes written.
- read bandwidth GB/s: ``src.sum()`` over the same 512 MiB (a decode step only reads weights,
  so this is the bound used for batch-1 decode).
- the CPU's theoretical fp32 peak: physical cores x clock x FLOPs per cycle of its vector units
  (``cpu_peak``), given beside the measured bound as a sanity check on it. The clock is measured
  (``clock.measured_mhz``): cpuinfo's figure is the base clock in most VMs, below what the cores run at.

``Bounds`` samples the limits several times in one run (before and after each section) and keeps
the maximum of each: a busy moment can only make a measurement lower, never higher. A figure
above 1 of the bound is flagged as a measurement error (``fraction``), never reported as a result.

A prefill token costs about ``2 * params`` FLOPs (matmuls dominate at short context); a
batch-1 decode token reads every weight once, so it is bound by bytes / bandwidth.
"""
from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .clock import measured_mhz


@dataclass
class MachineLimits:
    gemm_gflops: float  # fp32, the fastest kernel in gemm_by_kernel
    copy_gbps: float  # (read + write) bytes per second / 1e9
    read_gbps: float  # bytes read per second / 1e9
    threads: int
    cpu: str
    cores: int
    gemm_by_kernel: dict[str, float] = field(default_factory=dict)  # GFLOP/s of each kernel measured
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)  # when measured

    def to_dict(self) -> dict:
        return asdict(self)


def _best(fn, repeats: int) -> float:
    fn()  # warm up (allocations, thread pool, oneDNN primitive creation)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gemm_kernels(a: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], object]]:
    """``a @ w.T`` (a: [M, K], w: [N, K], a linear layer's layout) by each fp32 kernel available here."""
    kernels: dict[str, Callable[[], object]] = {"torch.mm": lambda: torch.mm(a, w.t())}
    if torch.backends.mkldnn.is_available():
        w_dnn = w.to_mkldnn()  # the weight reordered once, as a deployed oneDNN linear would hold it
        kernels["torch mkldnn_linear"] = lambda: torch._C._nn.mkldnn_linear(a.to_mkldnn(), w_dnn, None)
    try:  # vLLM's CPU fp32 linear (vllm/model_executor/layers/utils.py: dispatch_cpu_unquantized_gemm)
        from vllm import _custom_ops as ops
    except ImportError:
        ops = None
    if ops is not None and getattr(ops, "_supports_onednn", False):
        handler = ops.create_onednn_mm(w.t(), 32)
        kernels["vllm onednn_mm"] = lambda: ops.onednn_mm(handler, a, None)
    return kernels


def measure(quick: bool = False, device: str = "cpu") -> MachineLimits:
    """Measure each GEMM kernel and the copy / read bandwidth with the current torch thread settings.

    ``device="cuda"``: the GPU's bf16 ``torch.mm`` and its memory bandwidth instead (the run dtype there)."""
    m, k, n = (512 if quick else 2048), 1024, 3072
    repeats = 3 if quick else 8
    size = (64 if quick else 512) * 2**20 // 4  # float32 elements
    if device == "cuda":
        return _measure_cuda(m, k, n, size, repeats)
    a, w = torch.randn(m, k), torch.randn(n, k)
    by_kernel = {}
    for name, fn in gemm_kernels(a, w).items():
        try:
            by_kernel[name] = 2 * m * k * n / _best(fn, repeats) / 1e9
        except RuntimeError:  # a kernel this build cannot run for these shapes is simply not a candidate
            continue
    src, dst = torch.randn(size), torch.empty(size)
    copy_s = _best(lambda: dst.copy_(src), repeats)
    read_s = _best(lambda: src.sum(), repeats)
    return MachineLimits(gemm_gflops=max(by_kernel.values()), copy_gbps=2 * size * 4 / copy_s / 1e9,
                         read_gbps=size * 4 / read_s / 1e9, threads=torch.get_num_threads(), cpu=_cpu_name(),
                         cores=os.cpu_count() or 0, gemm_by_kernel=by_kernel, loadavg=os.getloadavg())


def _measure_cuda(m: int, k: int, n: int, size: int, repeats: int) -> MachineLimits:
    def synced(fn):  # GPU work is asynchronous: time to completion
        return lambda: (fn(), torch.cuda.synchronize())

    a, w = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    gemm = 2 * m * k * n / _best(synced(lambda: torch.mm(a, w.t())), repeats) / 1e9
    src, dst = torch.randn(size, device="cuda"), torch.empty(size, device="cuda")
    copy_s = _best(synced(lambda: dst.copy_(src)), repeats)
    read_s = _best(synced(lambda: src.sum()), repeats)
    return MachineLimits(gemm_gflops=gemm, copy_gbps=2 * size * 4 / copy_s / 1e9, read_gbps=size * 4 / read_s / 1e9,
                         threads=torch.get_num_threads(), cpu=torch.cuda.get_device_name(), cores=os.cpu_count() or 0,
                         gemm_by_kernel={"torch.mm bf16 (cuda)": gemm}, loadavg=os.getloadavg())


# -- the theoretical peak --------------------------------------------------------------------------------------

@dataclass
class CpuPeak:
    """fp32 peak = cores x GHz x FLOPs per cycle per core; ``isa`` says which vector units were assumed."""

    cores: int
    ghz: float
    flops_per_cycle: int
    isa: str
    clock_source: str = "cpuinfo 'cpu MHz'"

    @property
    def gflops(self) -> float:
        return self.cores * self.ghz * self.flops_per_cycle

    def to_dict(self) -> dict:
        return asdict(self) | {"gflops": self.gflops}


def flops_per_cycle(flags: set[str], vendor: str, family: int) -> tuple[int, str]:
    """fp32 FLOPs one core can retire per cycle, from its vector ISA: lanes x 2 (an FMA is 2 FLOPs) x FMA units.

    Two FMA units per core everywhere (Intel client/server cores since Haswell, AMD since Zen 2): an upper
    bound for the few Xeons with a single 512-bit unit, which is what a peak is for. AMD Zen 4 (family 25)
    executes AVX-512 on 256-bit units (two passes), so it gets the AVX2 rate; Zen 5 (family 26) has full
    512-bit units.
    """
    if "avx512f" in flags and not (vendor == "AuthenticAMD" and family < 26):
        return 2 * 16 * 2, "avx512f, 2 x 512-bit FMA"
    if "avx512f" in flags:
        return 2 * 8 * 2, "avx512f on 256-bit units (AMD Zen 4), 2 x 256-bit FMA"
    if "fma" in flags and "avx2" in flags:
        return 2 * 8 * 2, "avx2+fma, 2 x 256-bit FMA"
    if "avx" in flags:
        return 8 * 2, "avx, 256-bit add + mul"
    return 4 * 2, "sse, 128-bit add + mul"


def cpu_peak(cpuinfo: str, max_mhz: float | None = None, cores: int | None = None,
             clock_source: str = "cpufreq max") -> CpuPeak:
    """The theoretical fp32 peak from a ``/proc/cpuinfo`` text.

    Cores: distinct (physical id, core id) pairs (hyperthreads share their core's FMA units), else the
    processor count. Clock: ``max_mhz`` (measured, or cpufreq's maximum; ``clock_source`` says which),
    else the highest ``cpu MHz`` listed: in a VM that is often the base clock, so the cores can run faster
    than this peak assumes.
    """
    blocks = [b for b in cpuinfo.strip().split("\n\n") if b.strip()]
    fields = [dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in b.splitlines())) for b in blocks]
    first = fields[0] if fields else {}
    flags = set(first.get("flags", "").split())
    vendor = first.get("vendor_id", "")
    family = int(first.get("cpu family", "0") or 0)
    if cores is None:
        ids = {(f.get("physical id", "0"), f.get("core id")) for f in fields if f.get("core id") is not None}
        cores = len(ids) or len(fields) or 1
    mhz = max_mhz or max((float(f["cpu MHz"]) for f in fields if re.fullmatch(r"[\d.]+", f.get("cpu MHz", "x"))),
                         default=0.0)
    per_cycle, isa = flops_per_cycle(flags, vendor, family)
    return CpuPeak(cores=cores, ghz=mhz / 1000, flops_per_cycle=per_cycle, isa=isa,
                   clock_source=clock_source if max_mhz else "cpuinfo 'cpu MHz'")


def this_cpu_peak() -> CpuPeak | None:
    """``cpu_peak`` of this machine (None where /proc/cpuinfo is missing), cores limited to those usable here.

    Clock, first found: measured with every usable core busy (``clock.measured_mhz``), cpufreq's maximum,
    cpuinfo's ``cpu MHz``.
    """
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    peak = cpu_peak(text)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else peak.cores
    cores = min(peak.cores, usable)
    mhz, source = measured_mhz(cores), "measured: dependent-add chain on every core at once"
    if mhz is None:
        source = "cpufreq max"
        try:
            with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
                mhz = int(f.read()) / 1000  # kHz
        except (OSError, ValueError):
            pass
    return cpu_peak(text, mhz, cores, source)


# -- bounds over a whole run ------------------------------------------------------------------------------------

def loadavg_text() -> str:
    """'load average 1.20, 0.90, 0.80 (1/5/15 min)': printed beside every table."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"


class Bounds:
    """Machine limits sampled before and after each section of a run; the bound is the maximum seen."""

    def __init__(self, quick: bool = False, device: str = "cpu"):
        self.quick, self.device = quick, device
        self.samples: list[tuple[str, MachineLimits]] = []
        self.peak = this_cpu_peak() if device == "cpu" else None  # a GPU's peak is not read from /proc/cpuinfo

    def sample(self, label: str) -> MachineLimits:
        """Measure now (``label``: e.g. 'before prefix'); print one line with the load average."""
        limits = measure(self.quick, self.device)
        self.samples.append((label, limits))
        kernels = ", ".join(f"{k} {v:.1f}" for k, v in limits.gemm_by_kernel.items())
        print(f"bounds {label}: fp32 GEMM {kernels} GFLOP/s; copy {limits.copy_gbps:.1f} GB/s, read "
              f"{limits.read_gbps:.1f} GB/s; {loadavg_text()}", flush=True)
        return limits

    @property
    def best(self) -> MachineLimits:
        """Each limit's maximum over the samples (GEMM: over every kernel too)."""
        if not self.samples:
            self.sample("start")
        all_ = [s for _, s in self.samples]
        kernels: dict[str, float] = {}
        for s in all_:
            for k, v in s.gemm_by_kernel.items():
                kernels[k] = max(kernels.get(k, 0.0), v)
        last = all_[-1]
        return MachineLimits(gemm_gflops=max(s.gemm_gflops for s in all_), copy_gbps=max(s.copy_gbps for s in all_),
                             read_gbps=max(s.read_gbps for s in all_), threads=last.threads, cpu=last.cpu,
                             cores=last.cores, gemm_by_kernel=kernels, loadavg=last.loadavg)

    def to_dict(self) -> dict:
        best = self.best
        return {"best": best.to_dict(), "samples": [{"label": lb, **s.to_dict()} for lb, s in self.samples],
                "peak": self.peak.to_dict() if self.peak else None,
                "gemm_of_peak": best.gemm_gflops / self.peak.gflops if self.peak and self.peak.gflops else None}

    def text(self) -> str:
        """One paragraph for a report (``bounds_text``)."""
        return bounds_text(self.to_dict())


def bounds_text(b: dict) -> str:
    """The bounds paragraph from ``Bounds.to_dict()`` (as stored in a result JSON): every kernel's best GEMM,
    the bandwidths, how many samples, and the theoretical peak beside them."""
    m = b["best"]
    kernels = ", ".join(f"{k} {v:.1f}" for k, v in m.get("gemm_by_kernel", {}).items()) or "torch.mm"
    text = (f"Bounds (max of {len(b['samples'])} samples in this run): fp32 GEMM {m['gemm_gflops']:.1f} GFLOP/s "
            f"({kernels}), copy {m['copy_gbps']:.1f} GB/s, read {m['read_gbps']:.1f} GB/s")
    if b.get("peak"):
        p = b["peak"]
        clock = f" ({p['clock_source']})" if "clock_source" in p else ""
        text += (f"; theoretical fp32 peak {p['gflops']:.1f} GFLOP/s ({p['cores']} cores x {p['ghz']:.2f} GHz{clock} "
                 f"x {p['flops_per_cycle']} FLOP/cycle, {p['isa']}): the GEMM bound is {b['gemm_of_peak']:.2f} of it")
    return text + "."


def fraction(value: float, bound: float) -> dict:
    """``value / bound``, with ``measurement_error`` set when it exceeds 1: a bound that a run beats was
    measured too low (a busy moment, or a slower kernel than the run's), so the figure is not a result."""
    f = value / bound if bound else float("nan")
    return {"value": value, "bound": bound, "fraction": f, "measurement_error": bool(f > 1.0)}


def fraction_text(fr: dict) -> str:
    """'0.62' or '1.12 (MEASUREMENT ERROR: above the bound)'."""
    return f"{fr['fraction']:.2f}" + (" (MEASUREMENT ERROR: above the bound)" if fr["measurement_error"] else "")


@dataclass
class ModelCost:
    """Work per token of a decoder-only LM, from its shape."""

    matmul_params: int  # weights multiplied per prompt token (all layers, no embedding/lm_head)
    lm_head_params: int  # vocab * hidden: multiplied once per sequence at prefill, once per token at decode
    weight_bytes: int  # what a decode step reads at batch 1: layer weights + lm_head (one embedding row only)

    @classmethod
    def of(cls, config) -> "ModelCost":
        h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
        head_dim = config.head_dim
        attn = h * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
        per_layer = attn + 3 * h * inter
        lm_head = config.vocab_size * h
        return cls(matmul_params=layers * per_layer, lm_head_params=lm_head,
                   weight_bytes=4 * (layers * per_layer + lm_head))

    def prefill_flops(self, prompt_lens: list[int]) -> float:
        return sum(2.0 * self.matmul_params * n + 2.0 * self.lm_head_params for n in prompt_lens)

    def decode_bound_tok_s(self, limits: MachineLimits) -> float:
        return limits.read_gbps * 1e9 / self.weight_bytes
