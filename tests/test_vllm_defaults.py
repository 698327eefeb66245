"""mmfuse's vLLM defaults for the machine: KV cache sizing, core binding, and what may spawn processes.

No engine starts here (the engines themselves run with these defaults in test_vllm_plugin.py and, with no
VLLM_* variable set at all, in test_examples.py).
"""
import os
import subprocess
import sys

import pytest

from mmfuse import ConfigError
from mmfuse.backends.vllm_defaults import GiB, EngineOptions, cpu_binding, default_cpu_kv_cache_bytes


def test_engine_options_are_checked_and_size_the_kv_cache(monkeypatch):
    with pytest.raises(ConfigError, match="kv_cache_gb or gpu_memory_utilization, not both"):
        EngineOptions(kv_cache_gb=1, gpu_memory_utilization=0.5)
    for bad in (dict(kv_cache_gb=0), dict(gpu_memory_utilization=1.5), dict(tensor_parallel_size=0),
                dict(max_model_len=1)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            EngineOptions(**bad)
    assert EngineOptions(kv_cache_gb=1.5).memory_args(cpu=True) == {"kv_cache_memory_bytes": int(1.5 * GiB)}
    assert EngineOptions(gpu_memory_utilization=0.5).memory_args(cpu=False) == {"gpu_memory_utilization": 0.5}
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kv = EngineOptions().memory_args(cpu=True)["kv_cache_memory_bytes"]
    assert kv == default_cpu_kv_cache_bytes() and GiB // 2 <= kv <= 4 * GiB and kv % 2**20 == 0
    assert EngineOptions().memory_args(cpu=False) == {}  # on GPUs vLLM's own default works
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # the user's variable wins (vLLM reads it itself)
    assert EngineOptions().memory_args(cpu=True) == {}


def test_cpu_binding_splits_this_process_cpus_between_ranks():
    cpus = sorted(os.sched_getaffinity(0))
    assert cpu_binding(1) == ",".join(map(str, cpus))
    if len(cpus) >= 2:
        ranks = cpu_binding(2).split("|")
        assert len(ranks) == 2 and not set(ranks[0].split(",")) & set(ranks[1].split(","))
    with pytest.raises(ConfigError, match="at least one CPU per rank"):
        cpu_binding(len(cpus) + 1)


@pytest.mark.parametrize("guarded", [False, True])
def test_tensor_parallel_from_an_unguarded_script_is_refused_with_the_fix(tmp_path, guarded):
    """Ranks are spawned processes that re-import the main script: an unguarded one is refused up front."""
    body = "from mmfuse.backends.vllm_defaults import check_can_spawn\ncheck_can_spawn(1)\n"
    body += ("if __name__ == '__main__':\n    check_can_spawn(2)\n" if guarded else "check_can_spawn(2)\n")
    script = tmp_path / "user_script.py"
    script.write_text(body)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    if guarded:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 1
        assert 'tensor_parallel_size x pipeline_parallel_size = 2 ranks start one vLLM process per rank' in proc.stderr
        assert 'if __name__ == "__main__":' in proc.stderr


def test_each_engine_gets_a_binding_for_its_own_rank_count_unless_the_user_set_one(monkeypatch):
    """A one-rank engine and then a two-rank one in the same process (as in the test session): the second
    needs one CPU set per rank, not the first's binding."""
    pytest.importorskip("vllm")
    from mmfuse.backends import vllm_defaults
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs vLLM's CPU platform and two CPUs")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(vllm_defaults, "_our_binding", [])
    vllm_defaults.apply_process_defaults(1)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == cpu_binding(1)
    vllm_defaults.apply_process_defaults(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == cpu_binding(2) and "|" in cpu_binding(2)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the user's choice stays
    vllm_defaults.apply_process_defaults(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
