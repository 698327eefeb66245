"""The examples, the documentation's Python snippets and the README's commands, run as a new user would.

Every ``examples/*.py`` and every ```` ```python ```` snippet in README.md, docs/**/*.md and
mmfuse/vllm_plugin/README.md runs as a plain script file (no ``if __name__ == "__main__":`` guard
added) in a fresh subprocess, with the interpreter of this test run and an environment without any
``VLLM_CPU_*`` or ``VLLM_ENABLE_V1_MULTIPROCESSING`` variable (what a new shell has), so mmfuse's
own vLLM defaults are what runs. The working directory stands in for the repository root: its
``demo`` links to the repository's (the documented ``demo/ckpt`` paths work), and what a snippet
writes to its working directory stays out of the checkout.

- A snippet is also an example file: its code equals an ``examples/*.py`` file's code after the
  module docstring. Such a snippet runs once, as that example (test id: the example plus the
  snippet locations it stands for). ``test_every_snippet_is_an_example`` keeps them in step.
- What a run must print is the indented block after "Prints" in the example's docstring: those
  lines in that order among the output lines (vLLM's log lines may come between; ``...`` in a
  documented line matches anything). Examples assert their own results and print ``ok`` after,
  or print results (the demo checkpoint's sentences) that the documented lines pin down.
- A fence ```` ```python no-run ```` marks a snippet that cannot run here (a hub download, a GPU);
  those are listed, never run.
- Examples that talk to a server (docstring: "Start the server first") run inside the test of
  the README's ``mmfuse serve`` command, against that server.

vLLM engine starts dominate the time (30-60 s each on 2 CPU cores), so each test here starts at
most one engine, and only where a documented command or snippet does.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), REPO / "mmfuse" / "vllm_plugin" / "README.md"]
NO_RUN = "no-run"  # fence info word: the snippet is shown, not run
SERVER_MARK = "Start the server first"  # docstring of an example that needs `mmfuse serve` running
RUN_TIMEOUT = 600

try:
    import vllm  # noqa: F401
    BACKEND = "vllm"
except ImportError:
    BACKEND = "hf"


# -- what is documented ---------------------------------------------------------------------------------------

@dataclass
class Snippet:
    where: str  # "README.md:126" (the fence line)
    info: str  # the fence's info string, e.g. "python" or "python no-run"
    code: str

    @property
    def runnable(self) -> bool:
        return NO_RUN not in self.info.split()


def fenced_blocks(path: Path, language: str) -> list[Snippet]:
    """The ```language blocks of a markdown file (indented fences too, e.g. inside list items)."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S.*)?$", lines[i])
        if not m:
            i += 1
            continue
        indent, info, start = m.group(1), (m.group(2) or "").strip(), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        if info.split()[:1] == [language]:
            blocks.append(Snippet(f"{path.relative_to(REPO)}:{start + 1}", info, "\n".join(body) + "\n"))
    return blocks


def doc_snippets() -> list[Snippet]:
    return [s for path in DOCS for s in fenced_blocks(path, "python")]


def example_code(path: Path) -> str:
    """The example's code after its module docstring: what a snippet of it must equal."""
    source = path.read_text(encoding="utf-8")
    body = ast.parse(source).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        source = "\n".join(source.splitlines()[body[0].end_lineno:])
    return source


def _normal(code: str) -> str:
    return "\n".join(line.rstrip() for line in code.strip().splitlines())


def twin(snippet: Snippet) -> Path | None:
    return next((p for p in EXAMPLES if _normal(example_code(p)) == _normal(snippet.code)), None)


def documented_output(path: Path) -> list[str]:
    """The indented lines after the docstring's "Prints" paragraph ("Prints nothing": none)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=True) or ""
    if re.search(r"\bPrints nothing\b", doc):
        return []
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if re.search(r"\bPrints\b", line)), None)
    assert start is not None, f"{path.name}: the docstring does not say what it prints ('Prints ...:')"
    block = []
    for line in lines[start + 1:]:
        if line.startswith("    "):
            block.append(line[4:].rstrip())
        elif block:
            break
    assert block, f"{path.name}: no indented output block after 'Prints'"
    if BACKEND == "hf":
        block = [line.replace("backend: vllm", "backend: hf") for line in block]
    return block


def assert_prints(stdout: str, expected: list[str], what: str) -> None:
    """Each expected line, in order, equals a whole output line (``...`` matches anything)."""
    lines = [line.rstrip() for line in stdout.splitlines()]
    pos = 0
    for want in expected:
        pattern = re.compile(".*".join(re.escape(part) for part in want.split("...")) + r"\Z")
        hit = next((i for i in range(pos, len(lines)) if pattern.match(lines[i])), None)
        assert hit is not None, (f"{what}: expected a line {want!r} (after line {pos}) in its output:\n"
                                 + "\n".join(lines[-40:]))
        pos = hit + 1


# -- how a new user runs things -------------------------------------------------------------------------------

def user_cwd(tmp_path: Path) -> Path:
    """Where commands run: a stand-in for the repository root. Its ``demo`` links to the repository's, so
    the documented relative paths (``demo/ckpt``, ``demo/heldout.parquet``) resolve as in the clone, while
    files a snippet writes into its working directory (``train.parquet``) stay out of the checkout."""
    cwd = tmp_path / "repo-root"
    if not cwd.exists():
        cwd.mkdir()
        (cwd / "demo").symlink_to(REPO / "demo", target_is_directory=True)
    return cwd


def user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A new shell's environment: no vLLM CPU settings, the hub offline, this venv's commands on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VLLM_CPU_") and k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["HF_HUB_OFFLINE"] = "1"
    env["MMFUSE_CACHE"] = str(tmp_path / "mmfuse-cache")  # the sketch's per-base checkpoints, not in ~/.cache
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # as after `source .venv/bin/activate`
    env.update(extra)
    return env


def run(args: list[str] | str, env: dict, cwd: Path, what: str = "", timeout: int = RUN_TIMEOUT,
        shell: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, errors="replace",
                          timeout=timeout, shell=shell, executable="/bin/bash" if shell else None)
    assert proc.returncode == 0, (f"{what or args} exited {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-4000:]}"
                                  f"\n--- stderr (tail)\n{proc.stderr[-6000:]}")
    return proc


def run_script(path: Path, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """``python path`` (a plain script: nothing wraps it in a guard)."""
    return run([sys.executable, str(path)], env, cwd, what=str(path.relative_to(REPO)) if path.is_relative_to(REPO)
               else str(path))


def needs_server(path: Path) -> bool:
    return SERVER_MARK in (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "")


def starts_engine(code: str) -> bool:
    """Whether running this starts a vLLM engine (when vllm is installed)."""
    return bool(re.search(r'backend="(auto|vllm)"|from vllm import|MultimodalQwen3Pipeline\(|"serve"', code))


# -- the parametrisation -------------------------------------------------------------------------------------

SNIPPETS = doc_snippets()
RUNNABLE = [s for s in SNIPPETS if s.runnable]
TWINS = {s.where: twin(s) for s in RUNNABLE}


def _example_params():
    params = []
    for path in EXAMPLES:
        if needs_server(path):
            continue
        shows = [w for w, p in TWINS.items() if p == path]
        marks = [pytest.mark.vllm] if starts_engine(path.read_text(encoding="utf-8")) else []
        params.append(pytest.param(path, id=" = ".join([f"examples/{path.name}", *shows]), marks=marks))
    return params


def _orphan_params():
    """Snippets with no example twin still run (and test_every_snippet_is_an_example fails for them)."""
    return [pytest.param(s, id=s.where, marks=[pytest.mark.vllm] if starts_engine(s.code) else [])
            for s in RUNNABLE if TWINS[s.where] is None]


def run_unit(unit: Path | Snippet, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run an example file, or a snippet saved as a script file."""
    path = unit
    if isinstance(unit, Snippet):
        path = tmp_path / "snippet.py"
        path.write_text(unit.code, encoding="utf-8")
    return run_script(path, user_env(tmp_path), user_cwd(tmp_path))


def test_docs_have_snippets_and_examples_exist():
    assert len(RUNNABLE) >= 6 and len(EXAMPLES) >= 4, (len(RUNNABLE), [p.name for p in EXAMPLES])


def test_every_snippet_is_an_example():
    """Each runnable snippet is the code of an examples/*.py file (after its docstring), word for word."""
    missing = [s.where for s in RUNNABLE if TWINS[s.where] is None]
    assert not missing, f"snippets with no examples/*.py of the same code: {missing}"


def test_few_snippets_are_not_run():
    shown = [s.where for s in SNIPPETS if not s.runnable]
    assert len(shown) <= 3, f"too many ```python {NO_RUN} snippets: {shown}"


def test_examples_are_plain_scripts():
    """Unguarded (the point of mmfuse's in-process engine default), auto backend where a pipeline is made."""
    for path in EXAMPLES:
        source = path.read_text(encoding="utf-8")
        guards = [node for node in ast.parse(source).body
                  if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)]
        assert not guards, f"{path.name}: examples are plain scripts, without an `if __name__ == ...` guard"
        for call in re.findall(r"MultimodalPipeline\(([^)]*)\)", source):
            assert 'backend="auto"' in call or 'backend="hf"' in call, f"{path.name}: MultimodalPipeline({call})"
        documented_output(path)  # every example says what it prints


@pytest.mark.parametrize("unit", _example_params() + _orphan_params())
def test_example(unit, tmp_path):
    """Exit 0 and the documented output (a snippet with no example twin: exit 0)."""
    proc = run_unit(unit, tmp_path)
    if isinstance(unit, Path):
        assert_prints(proc.stdout, documented_output(unit), f"examples/{unit.name}")


# -- the README's commands ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 400) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited {proc.returncode} before it was up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"no 200 from /health within {timeout} s")


def readme_command(prefix: str) -> str:
    """The first command line in README.md's bash blocks that starts with ``prefix`` (comment removed)."""
    for block in fenced_blocks(REPO / "README.md", "bash"):
        for line in block.code.splitlines():
            if line.startswith(prefix):
                return line.split("  #")[0].strip()
    raise AssertionError(f"README.md has no command starting with {prefix!r}")


SERVER_CLIENTS = [p for p in EXAMPLES if needs_server(p)]


@pytest.mark.vllm
@pytest.mark.server
@pytest.mark.parametrize("clients", [pytest.param(SERVER_CLIENTS, id=" + ".join(
    " = ".join([f"examples/{p.name}", *[w for w, t in TWINS.items() if t == p]]) for p in SERVER_CLIENTS))])
def test_readme_serve_command_and_the_server_examples(clients, tmp_path):
    """`mmfuse serve demo/ckpt --port 8000 --api-key KEY` as the README has it (on a free port), the README's
    and docs/server.md's client examples against it, then SIGTERM: exit 0."""
    assert len(clients) >= 2, clients
    command = readme_command("mmfuse serve ")
    assert "--port 8000" in command and "demo/ckpt" in command, command
    port = _free_port()
    env = user_env(tmp_path)
    log = open(tmp_path / "server.log", "w")
    cwd = user_cwd(tmp_path)
    server = subprocess.Popen(command.replace("--port 8000", f"--port {port}"), shell=True, executable="/bin/bash",
                              cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(server, port)
        for path in clients:
            proc = run_script(path, dict(env, MMFUSE_URL=f"http://127.0.0.1:{port}/v1"), cwd)
            assert_prints(proc.stdout, documented_output(path), f"examples/{path.name}")
    except BaseException:
        log.flush()
        print((tmp_path / "server.log").read_text()[-6000:])
        raise
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the shell and the server (its own session)
        code = server.wait(timeout=120)
        log.close()
    assert code == 0, (tmp_path / "server.log").read_text()[-4000:]


@pytest.mark.vllm
def test_readme_try_offline_commands(tmp_path):
    """README "Try it offline", line by line in an empty directory: tiny base, init, info, a vector, generate
    (default backend). The generated text equals the transformers pipeline's greedy answer."""
    block = next(b for b in fenced_blocks(REPO / "README.md", "bash") if "mmfuse tiny-base base" in b.code)
    env = user_env(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    outputs = []
    for line in block.code.splitlines():
        if line.strip():
            outputs.append(run(line, env, cwd=work, what=line, shell=True).stdout)
    info = next(o for line, o in zip([x for x in block.code.splitlines() if x.strip()], outputs)
                if line.startswith("mmfuse info"))
    assert "vision" in info and "audio" in info, info
    generate = [x for x in block.code.splitlines() if x.startswith("mmfuse generate")][0]
    assert "--backend" not in generate
    from mmfuse import MultimodalPipeline

    vec = np.load(work / "vec.npy", allow_pickle=False)
    with MultimodalPipeline(work / "ckpt", backend="hf") as pipe:
        expected = pipe.generate({"text": "Describe <|vision|>.",
                                  "multimodal_data": {"multimodal_embeddings": {"vision": [vec]}}}, max_tokens=8)
    assert outputs[-1].rstrip("\n") == expected


def test_generate_demo_from_a_safetensors_file(tmp_path):
    """`mmfuse generate demo/ckpt --embeddings items.safetensors` (keys NAME or NAME.INDEX) writes back the
    held-out description the vectors encode (transformers: the vLLM path of this command is tested above)."""
    from safetensors.numpy import save_file

    from mmfuse.demo import PROMPT, heldout_rows

    row = heldout_rows(REPO / "demo" / "heldout.parquet", limit=1)[0]
    save_file({"sent": row["items"]["sent"][0], "tok.0": row["items"]["tok"][0]}, str(tmp_path / "items.safetensors"))
    proc = run(["mmfuse", "generate", "demo/ckpt", "--prompt", PROMPT, "--embeddings", str(tmp_path / "items.safetensors"),
                "--max-tokens", "24", "--backend", "hf"], user_env(tmp_path), user_cwd(tmp_path))
    assert proc.stdout.strip() == row["response"], proc.stdout


@pytest.mark.vllm
def test_eval_on_vllm_prints_one_json_line(tmp_path):
    """`mmfuse eval demo/ckpt demo/heldout.parquet --backend vllm --limit 20`: one JSON line, all exact."""
    proc = run(["mmfuse", "eval", "demo/ckpt", "demo/heldout.parquet", "--backend", "vllm", "--limit", "20"],
               user_env(tmp_path), user_cwd(tmp_path))
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    metrics = json.loads(lines[-1])
    assert metrics["backend"] == "vllm" and metrics["n"] == 20 and metrics["exact_match"] == 1.0, metrics


@pytest.mark.vllm
def test_demo_script_prints_the_table_and_one_status_line_per_stage(tmp_path):
    """`python scripts/demo.py` (what `make demo` runs): exit 0, the five reserved sentences, sent as raw text and
    encoded by MiniLM inside the backend, written back; on stderr nothing but mmfuse's status lines, each stage
    once (the engine's chatter is behind -v)."""
    from mmfuse.demo import DEMO_SENTENCES

    proc = run([sys.executable, str(REPO / "scripts" / "demo.py")], user_env(tmp_path), user_cwd(tmp_path))
    out, err = proc.stdout.splitlines(), proc.stderr.splitlines()
    print(f"scripts/demo.py: {len(out) + len(err)} output lines ({len(out)} stdout, {len(err)} stderr)")
    assert f"backend: {BACKEND}" in proc.stdout
    rows = [line for line in out if "| " in line and "[" in line]
    assert len(rows) == len(DEMO_SENTENCES), proc.stdout
    for sentence, line in zip(DEMO_SENTENCES, rows):
        assert line.split("|")[1].split("[")[0].strip() == sentence and line.endswith("[ok]"), line
    status = [line for line in err if line.startswith("mmfuse: ")]
    assert status and len(set(status)) == len(status), err
    others = [line for line in err if not line.startswith("mmfuse: ")]
    assert not others, f"stderr beside the status lines: {others}"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_demo_takes_a_sentence():
    """`make demo "a tiny blue cone in the corner"` (README) runs scripts/demo.py with the sentence as one argument,
    `ARGS=...` goes through as it is, and other unknown targets still fail (make -n: nothing runs)."""
    def dry(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)

    def demo_line(proc: subprocess.CompletedProcess) -> str:
        assert proc.returncode == 0, proc.stderr
        return next(line for line in proc.stdout.splitlines() if "scripts/demo.py" in line).split("scripts/demo.py")[1]

    assert demo_line(dry("demo", "a tiny blue cone in the corner")).strip() == "'a tiny blue cone in the corner'"
    assert demo_line(dry("demo", "it's a test")).strip() == "'it'\\''s a test'"
    assert demo_line(dry("demo", "ARGS=--backend hf 'a b'")).strip() == "--backend hf 'a b'"
    assert demo_line(dry("demo")).strip() == ""
    assert dry("no-such-target").returncode != 0
