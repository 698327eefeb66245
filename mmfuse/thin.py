"""Thin checkpoints: what a checkpoint adds to its base LM, plus a reference to that base.

A thin checkpoint directory holds the full one's config, tokenizer files, projector weights
(``mm_projectors.safetensors``) and encoders, but none of the LM's weight files; instead
``mmfuse_base.json`` says where they are: ``{"source": hub id or absolute path, "revision": commit
or null}``. ``export_thin`` writes one, after checking that the checkpoint's LM tensors are
exactly the base's (a checkpoint whose LM was trained or resized must travel whole).

``materialize`` (called by ``open_checkpoint``, so by ``mmfuse.load``, ``MultimodalPipeline`` and
the vLLM backend) turns a thin directory into a full one that every reader opens as usual: a
directory under ``$MMFUSE_CACHE/thin/`` of symlinks to the thin files and to the base's weight
files (linked, never copied) plus the weight index. ``push`` uploads a checkpoint, whole or thin,
with huggingface_hub.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import safe_open

from .checkpoint import INDEX_FILE, PROJECTOR_FILE, PROJECTOR_PREFIX, read_config, resolve, weight_files, write_index
from .config import ConfigError

BASE_FILE = "mmfuse_base.json"
_SKIP = {INDEX_FILE, BASE_FILE}  # never carried from a full checkpoint into a thin one, or into its links


def cache_root() -> Path:
    return Path(os.environ.get("MMFUSE_CACHE", Path.home() / ".cache" / "mmfuse"))


def resolve_base(source: str, revision: str | None = None) -> Path:
    """The base's directory: a local path as is, else the hub snapshot at ``revision``."""
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(source, revision=revision))
    except Exception as e:  # offline, unknown id or revision, auth: all read the same to a user
        raise ConfigError(f"base {source!r} (revision {revision}) is neither a local directory nor a reachable "
                          f"hub model: {e}") from e


def _lm_tensors(path: Path) -> dict[str, Path]:
    """{tensor name: file} of the LM's tensors (projector tensors excluded)."""
    out = {}
    for f in weight_files(path):
        with safe_open(f, framework="pt") as st:
            out.update({k: f for k in st.keys() if not k.startswith(PROJECTOR_PREFIX)})
    return out


def check_same_lm(ckpt: Path, base: Path) -> None:
    """Every LM tensor of ``ckpt`` must be the base's, bit for bit (names, shapes, values)."""
    mine, theirs = _lm_tensors(ckpt), _lm_tensors(base)
    for name, f in mine.items():
        if name not in theirs:
            raise ConfigError(f"{ckpt}: tensor {name} is not in the base {base}; export the checkpoint whole")
        with safe_open(f, framework="pt") as a, safe_open(theirs[name], framework="pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.shape != y.shape or x.dtype != y.dtype or not bool((x == y).all()):
                raise ConfigError(f"{ckpt}: tensor {name} differs from the base's (trained or resized LM); a thin "
                                  f"checkpoint would change the model: export it whole")
    with safe_open(ckpt / PROJECTOR_FILE, framework="pt") as st:
        in_file = set(st.keys())
    stray = [f.name for f in weight_files(ckpt) if f.name != PROJECTOR_FILE and any(
        k.startswith(PROJECTOR_PREFIX) for k in safe_open(f, framework="pt").keys())]
    if stray or not in_file:
        raise ConfigError(f"{ckpt}: projector weights must all be in {PROJECTOR_FILE} (found in {stray})")


def export_thin(ckpt: str | os.PathLike, out: str | os.PathLike, base: str, revision: str | None = None,
                overwrite: bool = False) -> Path:
    """Write ``out``: ``ckpt`` without the LM weights, referring to ``base`` (a hub id, with ``revision``, or
    a local directory, stored as an absolute path). ConfigError when the LM tensors are not the base's."""
    from .outdir import claim_output_dir, clear_entries

    src = resolve(ckpt)
    if (src / BASE_FILE).exists():
        raise ConfigError(f"{src} is already a thin checkpoint")
    if "mmfuse" not in read_config(src):
        raise ConfigError(f"{src} is not an mmfuse checkpoint (no 'mmfuse' section in config.json)")
    stale = claim_output_dir(out, overwrite)
    base_dir = resolve_base(base, revision)
    check_same_lm(src, base_dir)
    clear_entries(stale)
    dst = Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    lm_files = {f.name for f in weight_files(src)} - {PROJECTOR_FILE}
    for f in src.iterdir():
        if f.name in _SKIP or f.name in lm_files:
            continue
        if f.is_dir():
            if f.name == "encoders":  # local encoders travel with the checkpoint (copied, links followed)
                shutil.copytree(f, dst / f.name, symlinks=False)
        elif f.suffix in (".json", ".model", ".txt", ".jinja", ".tiktoken") or f.name == PROJECTOR_FILE:
            shutil.copy2(f, dst / f.name)
    source = str(Path(base).resolve()) if Path(base).is_dir() else base
    (dst / BASE_FILE).write_text(json.dumps({"source": source, "revision": revision}, indent=2) + "\n")
    return dst


def materialize(path: Path) -> Path:
    """A thin checkpoint's full view (made once under ``$MMFUSE_CACHE/thin/``); any other directory as is."""
    ref_file = path / BASE_FILE
    if not ref_file.is_file():
        return path
    ref = json.loads(ref_file.read_text())
    if not isinstance(ref, dict) or not isinstance(ref.get("source"), str):
        raise ConfigError(f"{ref_file}: expected {{\"source\": hub id or path, \"revision\": ...}}")
    base = resolve_base(ref["source"], ref.get("revision"))
    # the view is keyed by what it links: a changed thin checkpoint or base gets a new one
    key = hashlib.sha256(json.dumps([str(path.resolve()), str(base.resolve()), ref_file.read_text(),
                                     [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir())]
                                     ]).encode()).hexdigest()[:20]
    root = cache_root() / "thin"
    view = root / key
    if (view / INDEX_FILE).exists():
        return view
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=root))
    for f in path.iterdir():
        if f.name not in _SKIP:
            (tmp / f.name).symlink_to(f.resolve())
    for f in weight_files(base):
        if (tmp / f.name).exists():
            raise ConfigError(f"{path}: {f.name} is both a file of the thin checkpoint and a weight file of its base")
        (tmp / f.name).symlink_to(f.resolve())
    write_index(tmp)
    try:
        tmp.rename(view)  # atomic: a reader sees a whole view or none
    except OSError:  # another process made it meanwhile
        shutil.rmtree(tmp)
    return view


def push(ckpt: str | os.PathLike, repo: str, thin_base: str | None = None, revision: str | None = None,
         private: bool = False) -> str:
    """Upload a checkpoint to the hub repo ``repo`` (created if missing); with ``thin_base``, its thin export
    referring to that base. Returns the repo's URL."""
    from huggingface_hub import HfApi

    src = resolve(ckpt)
    api = HfApi()
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_thin(src, Path(tmp) / "thin", thin_base, revision) if thin_base else src
        if "mmfuse" not in read_config(folder):
            raise ConfigError(f"{src} is not an mmfuse checkpoint (no 'mmfuse' section in config.json)")
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, ignore_patterns=["train_state/*"])
    return str(url)
