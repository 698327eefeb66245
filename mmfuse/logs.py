"""How loud mmfuse and the libraries under it are: one status line per stage, the rest behind ``-v``.

``configure(level)`` is called once by the ``mmfuse`` command (``-v`` / ``-vv`` /
``--log-level``) before anything heavy is imported; library users may call it too.

- ``level=None`` (the default: quiet): vLLM logs errors only (``VLLM_LOGGING_LEVEL`` when
  unset; its warnings are ~20 lines of kernel and platform notes per start), transformers and libtorch's C++ logging errors
  only, no Hugging Face progress bars, and Python warnings of torch, transformers, vLLM,
  accelerate and peft are not shown (in child processes such as vLLM's engine core:
  no Deprecation/Future/UserWarnings at all, via ``PYTHONWARNINGS``); mmfuse's own
  logger ("mmfuse") logs at INFO.
- ``level="INFO"`` / ``"DEBUG"`` (``-v`` / ``-vv``): that level for mmfuse, vLLM and
  transformers, and every progress bar and warning back.
- ``level="WARNING"`` / ``"ERROR"`` / ``"CRITICAL"``: that level everywhere;
  ``ERROR`` and ``CRITICAL`` also hide the status lines.

vLLM logs to stderr (``VLLM_LOGGING_STREAM``, unless set): stdout carries results.
An explicit level overrides ``VLLM_LOGGING_LEVEL`` and ``TRANSFORMERS_VERBOSITY``;
with no level, values already in the environment are kept. The settings reach child
processes (vLLM's engine core) through those environment variables.

``status(msg)`` prints ``mmfuse: msg`` on stderr: one line per stage (loading a
checkpoint, starting an engine, writing an output).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
QUIET_LIBRARIES = r"(torch|transformers|vllm|accelerate|peft|huggingface_hub|tokenizers)(\.|$)"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TORCH_CPP_LEVELS = {"DEBUG": "INFO", "INFO": "INFO", "WARNING": "WARNING", "ERROR": "ERROR", "CRITICAL": "FATAL"}
# set only while quiet (and only where the user has not set them): no Hugging Face progress bars, and no
# library deprecation chatter from child processes (vLLM's engine core and workers start with this)
QUIET_ONLY = {"HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning"}

_level: str | None = None  # what configure() was last given (None: the quiet default)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest and callers may swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _check(level: str | None) -> str | None:
    if level is None:
        return None
    name = str(level).upper()
    if name not in LEVELS:
        raise ValueError(f"log level: expected one of {', '.join(LEVELS)}, got {level!r}")
    return name


def configure(level: str | None = None) -> None:
    """Set how much mmfuse, vLLM, transformers and torch print (see the module docstring)."""
    global _level
    _level = name = _check(level)
    explicit = name is not None
    loud = explicit and name in ("DEBUG", "INFO")
    numeric = getattr(logging, name or "WARNING")

    root = logging.getLogger()
    if not root.handlers:  # the caller's (or pytest's) handlers stay as they are
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    if explicit:
        root.setLevel(numeric)
    logging.getLogger("mmfuse").setLevel(numeric if explicit else logging.INFO)

    vllm_level = name or "ERROR"
    transformers_level = name.lower() if explicit else "error"
    _env("VLLM_LOGGING_LEVEL", vllm_level, explicit)
    _env("VLLM_LOGGING_STREAM", "ext://sys.stderr", False)  # stdout carries results (generated text, JSON)
    _env("TRANSFORMERS_VERBOSITY", transformers_level, explicit)
    _env("TORCH_CPP_LOG_LEVEL", TORCH_CPP_LEVELS[name or "ERROR"], explicit)  # libtorch's C++ warnings
    for key, quiet_value in QUIET_ONLY.items():
        if not loud:
            _env(key, quiet_value, False)
        elif _ours(key):  # set by an earlier quiet configure() in this process
            del os.environ[key]

    # libraries already imported read their environment variables no more: set them directly
    if "vllm" in sys.modules:
        logging.getLogger("vllm").setLevel(getattr(logging, os.environ["VLLM_LOGGING_LEVEL"].upper(), numeric))
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog
        tlog.set_verbosity(getattr(logging, os.environ["TRANSFORMERS_VERBOSITY"].upper(), logging.ERROR))
        tlog.enable_progress_bar() if loud else tlog.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
        enable_progress_bars() if loud else disable_progress_bars()

    ours = [f for f in warnings.filters if f[3] is not None and getattr(f[3], "pattern", None) == QUIET_LIBRARIES]
    for f in ours:  # drop the filters of an earlier configure() in this process
        warnings.filters.remove(f)
    if ours and hasattr(warnings, "_filters_mutated"):
        warnings._filters_mutated()
    if not loud:
        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=QUIET_LIBRARIES)
    quiet_import_chatter()


_OURS: dict[str, str] = {}  # environment variables configure() set, with the value it set


def _ours(key: str) -> bool:
    return key in os.environ and _OURS.get(key) == os.environ[key]


def _env(key: str, value: str, force: bool) -> None:
    """Set ``key`` unless the user already did; ``force`` (an explicit level) always sets it."""
    if force or key not in os.environ or _ours(key):
        os.environ[key] = value
        _OURS[key] = value


def quiet_engine() -> None:
    """Called before vLLM is first imported: its quiet defaults (errors only, on stderr) unless the user,
    or ``configure``, set others. Library users who never call ``configure`` get these too."""
    if _level is None:
        _env("VLLM_LOGGING_LEVEL", "ERROR", False)
    _env("VLLM_LOGGING_STREAM", "ext://sys.stderr", False)
    follow_vllm_level()
    if not verbose():  # a torch deprecation that vLLM's Triton shim trips on every import
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)


def quiet_torch_cpp() -> None:
    """libtorch reads ``TORCH_CPP_LOG_LEVEL`` once, when torch is first imported: called by ``import mmfuse``
    before torch, it keeps C++ warnings (vLLM's CPU kernels note their NUMA memory binding at every engine
    start) at ERROR unless the user set the variable or imported torch first."""
    if "torch" not in sys.modules:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def follow_vllm_level() -> None:
    """Apply ``VLLM_LOGGING_LEVEL`` to vLLM's loggers now. vLLM configures them only once an engine
    starts; what it logs while importing (that Triton has no CPU backend) would otherwise reach
    Python's last-resort handler. Runs when mmfuse is imported, so vLLM's spawned engine processes,
    which re-import the main module (and mmfuse with it) before vLLM, follow it too."""
    value = os.environ.get("VLLM_LOGGING_LEVEL", "").upper()
    if value in LEVELS:
        logging.getLogger("vllm").setLevel(value)


# loggers whose import-time warnings say nothing to an mmfuse user: torchao (the optional quantize-on-load
# backend, which transformers imports whenever it is installed) notes that its CUDA-only extensions do not load
# on a CPU build, and torch's pytree deprecates how torchao registers an enum
IMPORT_CHATTER = ("torchao", "torch.utils._pytree")
_quieted: set[str] = set()  # the IMPORT_CHATTER loggers whose level mmfuse set, hence may give back


def quiet_import_chatter() -> None:
    """Errors only from ``IMPORT_CHATTER`` loggers while quiet (unless their level was set by someone else);
    ``configure`` with INFO/DEBUG gives them back. Runs when mmfuse is imported, as ``follow_vllm_level``."""
    for name in IMPORT_CHATTER:
        logger = logging.getLogger(name)
        if verbose():
            if name in _quieted and logger.level == logging.ERROR:  # not changed since by someone else
                logger.setLevel(logging.NOTSET)
            _quieted.discard(name)
        elif logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)
            _quieted.add(name)


def level() -> str | None:
    """The level given to the last ``configure`` call (None: the quiet default)."""
    return _level


def verbose() -> bool:
    """Whether the user asked for INFO or DEBUG output (``-v``): backends may then keep library chatter."""
    return _level in ("DEBUG", "INFO")


def status(msg: str) -> None:
    """One status line on stderr, e.g. ``mmfuse: loading checkpoint demo/ckpt (vllm)``."""
    if _level in ("ERROR", "CRITICAL"):
        return
    print(f"mmfuse: {msg}", file=sys.stderr, flush=True)


__all__ = ["configure", "quiet_engine", "status", "level", "verbose", "LEVELS"]
