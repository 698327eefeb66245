"""The CI guard in conftest.py: under CI a skipped vllm/server test (or a skipped module) fails the run.

Each case runs a small inner pytest session (a subprocess) with the guard plugin (tests/ci_guard.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INI = """[pytest]
markers =
    vllm: engine
    server: server
"""

CASES = {
    "skipped vllm test": ("import pytest\n\n@pytest.mark.vllm\ndef test_a():\n    pytest.skip('no vllm')\n", 1),
    "skipped test in a server module": ("import pytest\n\ndef test_a():\n    pytest.skip('no openai')\n", 1),
    "module skipped by importorskip": ("import pytest\npytest.importorskip('no_such_module_mmfuse')\n\n"
                                       "def test_a():\n    pass\n", 1),
    "skipped unmarked test": ("import pytest\n\ndef test_a():\n    pytest.skip('optional')\n", 0),
    "strict xfail of a vllm test": ("import pytest\n\n@pytest.mark.vllm\n@pytest.mark.xfail(strict=True, reason='bug')\n"
                                    "def test_a():\n    assert False\n", 0),
    "passing vllm test": ("import pytest\n\n@pytest.mark.vllm\ndef test_a():\n    pass\n", 0),
}


def inner_run(tmp_path: Path, name: str, source: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text(INI)
    module = "test_server_case.py" if "server module" in name else "test_case.py"
    (tmp_path / module).write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MMFUSE_REQUIRE_ALL")} | env_extra
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # no hypothesis/schemathesis plugins: a fast inner run
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "ci_guard",
                           str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", list(CASES))
def test_ci_fails_on_skipped_vllm_or_server_tests(tmp_path, name):
    source, ci_rc = CASES[name]
    ci = inner_run(tmp_path, name, source, {"CI": "true"})
    assert ci.returncode == ci_rc, ci.stdout[-3000:] + ci.stderr[-2000:]
    if ci_rc:
        assert "skipped vllm/server tests (fail under CI)" in ci.stdout
    local = inner_run(tmp_path, name, source, {})  # outside CI a skip stays a skip (reported, not failing)
    assert local.returncode in (0, 5), local.stdout[-3000:]  # 5: the skipped module left nothing to run


def test_require_all_switch_works_without_ci(tmp_path):
    source, _ = CASES["skipped vllm test"]
    assert inner_run(tmp_path, "skipped vllm test", source, {"MMFUSE_REQUIRE_ALL": "1"}).returncode == 1
    assert inner_run(tmp_path, "skipped vllm test", source, {"CI": "false"}).returncode == 0
