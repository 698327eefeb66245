"""The mmfuse command: init, info, generate with .npy and .safetensors items."""
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

from mmfuse import MultimodalPipeline
from mmfuse.cli import main


def test_init_info_generate(qwen3_base, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["init", str(qwen3_base), str(out), "--modality", "m1:32", "--modality", "audio:8:linear"]) == 0
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "MMFuseQwen3ForCausalLM" in info
    assert "m1" in info and "audio" in info and f"{32 * 128 + 128 + 128 * 128 + 128:,}" in info  # mlp params

    a, b = np.random.rand(32).astype(np.float32), np.random.rand(3, 8).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    save_file({"m1": a, "audio": b}, str(tmp_path / "items.safetensors"))
    prompt = "Compare <|m1|> and <|audio|>"
    expected = MultimodalPipeline(out, backend="hf").generate(
        {"text": prompt, "multimodal_data": {"multimodal_embeddings": {"m1": [a], "audio": [b]}}}, max_tokens=8)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", prompt, "--embeddings", str(tmp_path / "items.safetensors"),
                 "--max-tokens", "8", "--backend", "hf"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    np.save(tmp_path / "b.npy", b)
    assert main(["generate", str(out), "--prompt", prompt, "--embeddings", f"m1={tmp_path / 'a.npy'}",
                 "--embeddings", f"audio={tmp_path / 'b.npy'}", "--max-tokens", "8", "--backend", "hf"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_errors_are_clean_and_pickles_refused(qwen3_ckpt, tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    r = subprocess.run([sys.executable, "-m", "mmfuse.cli", "generate", str(qwen3_ckpt), "--prompt", "<|m1|>",
                        "--embeddings", f"m1={tmp_path / 'obj.npy'}", "--backend", "hf"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "object arrays are refused" in r.stderr
    np.save(tmp_path / "bad.npy", np.ones(5, dtype=np.float32))
    r = subprocess.run([sys.executable, "-m", "mmfuse.cli", "generate", str(qwen3_ckpt), "--prompt", "<|m1|>",
                        "--embeddings", f"m1={tmp_path / 'bad.npy'}", "--backend", "hf"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "modality 'm1' item 0: wrong last dimension, expected 32" in r.stderr


# ---------------------------------------------------------------- first-hour CLI: output dirs, help, syntax, logs

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mmfuse import init_checkpoint  # noqa: E402
from mmfuse.cli import HelpFormatter, build_parser  # noqa: E402
from mmfuse.config import ConfigError, parse_modality_arg  # noqa: E402

LOG_ENV = ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
           "PYTHONWARNINGS", "TORCH_CPP_LOG_LEVEL")


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch):
    """main() configures logging for the process (mmfuse.logs): keep that from leaking into other tests."""
    for key in LOG_ENV:
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    loggers = {name: logging.getLogger(name).level for name in ("", "mmfuse", "vllm")}
    yield
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)
    from mmfuse import logs
    logs._level = None


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under root: file contents' sha256, symlink targets, directories."""
    digest = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            digest[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            digest[rel] = "dir"
        else:
            digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def previous_run(ckpt: Path, where: Path) -> Path:
    """A directory as an earlier init + training run leaves it: a checkpoint, metrics, training state."""
    shutil.copytree(ckpt, where)
    (where / "metrics.json").write_text('{"history": [{"step": 7}]}')
    (where / "train_state" / "step_00000007").mkdir(parents=True)
    (where / "train_state" / "step_00000007" / "progress.json").write_text("{}")
    return where


def test_init_refuses_a_non_empty_dir_and_leaves_it_byte_identical(qwen3_base, qwen3_ckpt, tmp_path, capsys):
    out = previous_run(qwen3_ckpt, tmp_path / "trained")
    before = tree_digest(out)
    assert main(["init", str(qwen3_base), str(out), "--modality", "m1:32"]) == 2
    err = capsys.readouterr().err
    assert f"mmfuse init: error: output directory {out} is not empty" in err and "--overwrite" in err
    assert tree_digest(out) == before
    with pytest.raises(ConfigError, match="overwrite=True"):  # the Python API refuses too
        init_checkpoint(qwen3_base, out, [parse_modality_arg("m1:32")])
    assert tree_digest(out) == before

    # --overwrite never deletes what mmfuse does not write: a foreign entry makes it refuse, untouched
    (out / "notes.md").write_text("mine")
    before = tree_digest(out)
    assert main(["init", str(qwen3_base), str(out), "--modality", "m1:32", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds entries mmfuse does not write (notes.md)" in err
    assert tree_digest(out) == before
    # writing over the base itself is refused even with --overwrite
    assert main(["init", str(qwen3_base), str(qwen3_base), "--modality", "m1:32", "--overwrite"]) == 2
    assert "is the base model itself" in capsys.readouterr().err

    # with --overwrite an earlier checkpoint + run is replaced: no stale metrics or training state survive
    (out / "notes.md").unlink()
    assert main(["init", str(qwen3_base), str(out), "--modality", "vision:8,tokens=2", "--overwrite"]) == 0
    assert not (out / "metrics.json").exists() and not (out / "train_state").exists()
    specs = json.loads((out / "config.json").read_text())["mmfuse"]["modalities"]
    assert list(specs) == ["vision"] and specs["vision"]["tokens_per_item"] == 2
    # an empty existing directory is fine without the flag
    (tmp_path / "empty").mkdir()
    assert main(["init", str(qwen3_base), str(tmp_path / "empty"), "--modality", "m1:32"]) == 0


def test_tiny_base_makes_a_base_that_init_accepts(tmp_path, capsys):
    base, ckpt = tmp_path / "base", tmp_path / "ckpt"
    assert main(["tiny-base", str(base), "--seed", "3"]) == 0
    assert f"wrote {base}" in capsys.readouterr().out
    before = tree_digest(base)
    assert main(["tiny-base", str(base)]) == 2  # the same output-directory rule as init
    assert "--overwrite" in capsys.readouterr().err and tree_digest(base) == before
    assert main(["init", str(base), str(ckpt), "--modality",
                 "vision:8:linear,tokens=2,placeholder=<img>,max_items=3", "--modality", "audio:4,hidden=16"]) == 0
    specs = json.loads((ckpt / "config.json").read_text())["mmfuse"]["modalities"]
    assert specs["vision"] == {"input_dim": 8, "projector": "linear", "hidden_dim": None, "tokens_per_item": 2,
                               "placeholder": "<img>", "max_items": 3}
    assert specs["audio"]["hidden_dim"] == 16 and specs["audio"]["projector"] == "mlp2x_gelu"
    assert main(["info", str(ckpt)]) == 0
    assert "<img>" in capsys.readouterr().out


@pytest.mark.parametrize("text, expected", [
    ("vision:768", dict(name="vision", input_dim=768, projector="mlp2x_gelu", tokens_per_item=1, hidden_dim=None,
                        placeholder="<|vision|>", max_items=16)),
    ("audio:128:linear", dict(projector="linear")),
    ("audio:128:linear,tokens=4", dict(projector="linear", tokens_per_item=4)),
    ("p:1280,hidden=2048,placeholder=<prot>,max_items=2", dict(hidden_dim=2048, placeholder="<prot>", max_items=2)),
    ("p:3, tokens_per_item=2 , hidden_dim=5", dict(tokens_per_item=2, hidden_dim=5)),  # field names, spaces
    ("p:3,max_items=1,tokens=3", dict(max_items=1, tokens_per_item=3)),  # any order
])
def test_modality_syntax(text, expected):
    spec = parse_modality_arg(text)
    assert {k: getattr(spec, k) for k in expected} == expected


@pytest.mark.parametrize("text, piece", [
    ("vision", "'vision' has no DIM"),
    ("vision:", "'' is not a positive integer DIM"),
    ("vision:x", "'x' is not a positive integer DIM"),
    ("vision:0", "'0' is not a positive integer DIM"),
    ("Vision:8", "'Vision' is not a valid modality name"),
    ("v:8:mlp9", "projector 'mlp9' is not one of"),
    ("v:8:linear:4", "'v:8:linear:4' has more than NAME:DIM:PROJECTOR"),
    ("v:8,tokens=0", "'tokens=0' needs a positive integer for tokens_per_item"),
    ("v:8,hidden=big", "'hidden=big' needs a positive integer for hidden_dim"),
    ("v:8,colour=red", "'colour=red' has an unknown key 'colour'"),
    ("v:8,tokens", "'tokens' is not key=value"),
    ("v:8,", "'' is not key=value"),
    ("v:8,tokens=2,tokens=3", "'tokens=3' sets tokens_per_item a second time"),
    ("v:8,placeholder=", "'placeholder=' has no value"),
])
def test_modality_syntax_errors_name_the_bad_piece(text, piece):
    with pytest.raises(ConfigError) as e:
        parse_modality_arg(text)
    assert str(e.value).startswith(f"--modality {text!r}: ") and piece in str(e.value)


def test_bad_modality_on_the_command_line_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["init", "base", str(tmp_path / "out"), "--modality", "v:8,colour=red"])
    assert e.value.code == 2
    assert "argument --modality: --modality 'v:8,colour=red': 'colour=red' has an unknown key" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _subcommands(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subcommands(sub, (*prefix, name))


def test_every_subcommand_has_help_examples_and_defaults(capsys):
    commands = dict(_subcommands(build_parser()))
    assert {("init",), ("info",), ("generate",), ("tiny-base",), ("train",), ("eval",), ("data", "check"),
            ("serve",), ("bench",)} <= set(commands)
    for path, parser in commands.items():
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0, path
        text = capsys.readouterr().out
        assert "examples:" in text, path  # an example epilog per command
        formatter = HelpFormatter(prog="mmfuse")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"mmfuse {' '.join(path)}: {action.dest} has no help text"
            shown = formatter._get_help_string(action)
            if action.option_strings and action.default not in (None, False, True, [], argparse.SUPPRESS):
                assert "default" in shown.lower(), f"mmfuse {' '.join(path)} {action.option_strings}: {shown!r}"
    for top in (["--help"], ["bench", "throughput", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(top)
        assert e.value.code == 0
    assert "NAME:DIM[:PROJECTOR][,tokens=K][,hidden=H][,placeholder=P][,max_items=N]" in \
        build_parser()._subparsers._group_actions[0].choices["init"].format_help()


def test_help_as_a_program_and_under_python_m_mmfuse_training():
    for args in (["-m", "mmfuse.cli", "generate", "--help"], ["-m", "mmfuse.training", "train", "--help"]):
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "examples:" in r.stdout and "(default: " in r.stdout


def test_verbose_and_log_level_set_library_logging(qwen3_ckpt, monkeypatch, capsys):
    from mmfuse import logs

    for key in LOG_ENV:
        monkeypatch.delenv(key, raising=False)
    assert main(["info", str(qwen3_ckpt)]) == 0  # quiet default: vLLM and transformers errors only, no progress bars
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and logs.level() is None
    assert "ignore::FutureWarning" in os.environ["PYTHONWARNINGS"]  # for vLLM's child processes
    assert main(["info", str(qwen3_ckpt), "-v"]) == 0  # after the command as well as before it
    assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO" and os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ and "PYTHONWARNINGS" not in os.environ
    assert logs.verbose()
    assert main(["-vv", "info", str(qwen3_ckpt)]) == 0 and os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert main(["--log-level", "error", "info", str(qwen3_ckpt)]) == 0
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR" and logs.level() == "ERROR"
    capsys.readouterr()
    logs.status("hidden at ERROR")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # the user's own setting wins over the quiet default
    assert main(["info", str(qwen3_ckpt)]) == 0 and os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    logs.status("loading checkpoint demo/ckpt (vllm)")
    assert capsys.readouterr().err == "mmfuse: loading checkpoint demo/ckpt (vllm)\n"


def test_import_chatter_is_quiet_by_default_given_back_with_verbose_and_a_users_level_is_kept(monkeypatch):
    from mmfuse import logs

    for key in LOG_ENV:
        monkeypatch.delenv(key, raising=False)
    torchao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    levels = (torchao.level, pytree.level)
    try:
        torchao.setLevel(logging.NOTSET)
        pytree.setLevel(logging.WARNING)  # set by someone else: mmfuse leaves it alone
        logs.configure(None)
        assert (torchao.level, pytree.level) == (logging.ERROR, logging.WARNING)
        logs.configure("INFO")
        assert (torchao.level, pytree.level) == (logging.NOTSET, logging.WARNING)
    finally:
        torchao.setLevel(levels[0])
        pytree.setLevel(levels[1])
        logs._quieted.clear()
