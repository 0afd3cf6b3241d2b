# t2i-engine: `make demo` runs the quickstart, `make test` runs the whole suite.
# Both create .venv on first use (python3 -m venv) and install torch first, then the engine,
# the SDK and every plugin in editable mode with their test extras.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.t2i-installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)
# each model plugin's embedded demo (a tiny model it trained itself on the shapes data)
DEMOS   := $(wildcard examples/*-demo.toml)
# pytest-xdist workers for `make test`: in one process the suite takes about 10 minutes on the
# 2-core development machine; override with `make test TEST_WORKERS=4` (or 0 for one process).
# --dist loadfile keeps a test file on one worker, so its module-scoped fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: demo test install serve bench wheels clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "t2i-engine needs Python >= 3.11; $(PYTHON) is " + sys.version.split()[0] + " (pick another: make PYTHON=python3.12 ...)")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml sdk/pyproject.toml $(PLUGINS)
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[test]' -e 'sdk[test]' $(foreach p,$(PLUGINS),-e '$(dir $(p))[test]')
	$(PIP) install --quiet --no-deps k-diffusion==0.1.1.post1  # a test reference; its deps pin numpy < 2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/t2i-engine run examples/quickstart.toml
	@set -e; for job in $(DEMOS); do echo "== $$job"; $(VENV)/bin/t2i-engine run $$job; done

# the web page and REST API on http://127.0.0.1:7860/ over the shipped shapes model (docs/serving.md)
serve: $(STAMP)
	$(VENV)/bin/t2i-engine serve examples/serve.toml

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# every distribution (engine, sdk, plugins) as a wheel in dist/, built offline with the venv's
# setuptools: pip install --find-links dist t2i-plugin-controlnet
wheels: $(STAMP)
	rm -rf dist
	$(PIP) wheel --quiet --no-deps --no-build-isolation --wheel-dir dist ./ ./sdk/ $(dir $(PLUGINS))
	@ls dist

bench: $(STAMP)
	$(PY) benchmarks/sampler_overhead.py
	$(PY) benchmarks/train_loop.py
	$(PY) benchmarks/kernel_ops.py

clean:
	rm -rf $(VENV) outputs runs
