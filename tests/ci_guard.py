"""CI guard, a pytest plugin (loaded by conftest.py): no green run by skipping.

Under CI (``CI`` set to anything but empty/0/false) or ``MMFUSE_REQUIRE_ALL=1``, a skipped
test marked ``vllm`` or ``server``, or a test module skipped as a whole (a module-level
``importorskip``: its tests' markers are unknown), makes the run fail: a broken vLLM or
openai install must not give a green run. Outside CI such skips are listed in the summary.
Tests in ``test_server*.py`` files get the ``server`` marker here, whichever file they are in.
Imports nothing heavy, so tests/test_ci_guard.py can run it in small inner sessions.
"""
from __future__ import annotations

import os

import pytest

REQUIRED_MARKERS = ("vllm", "server")  # under CI these may not be skipped


def require_all() -> bool:
    """True on CI (``CI`` set to anything but empty/0/false) or with ``MMFUSE_REQUIRE_ALL=1``."""
    def on(name):
        return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
    return on("CI") or on("MMFUSE_REQUIRE_ALL")


_forbidden_skips: list[str] = []


def pytest_collection_modifyitems(config, items):
    for item in items:  # every server test carries the marker, whichever file it is in
        module = getattr(item, "module", None)
        if module is not None and module.__name__.rpartition(".")[2].startswith("test_server"):
            item.add_marker(pytest.mark.server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):  # an xfail ran and failed as expected: not a skip
        marks = [m for m in REQUIRED_MARKERS if item.get_closest_marker(m)]
        if marks:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            _forbidden_skips.append(f"{item.nodeid} [{', '.join(marks)}]: {reason}")


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped: its tests' markers are unknown, so it counts
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _forbidden_skips.append(f"{report.nodeid} [whole module]: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if require_all() and _forbidden_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _forbidden_skips:
        return
    strict = require_all()
    terminalreporter.section("skipped vllm/server tests" + (" (fail under CI)" if strict else ""),
                             red=strict, yellow=not strict)
    for line in _forbidden_skips:
        terminalreporter.line(line)
    if strict:
        terminalreporter.line(f"{len(_forbidden_skips)} required test(s) or module(s) skipped: the run fails "
                              "(CI / MMFUSE_REQUIRE_ALL). Fix the vllm/openai install instead of skipping.", red=True)
