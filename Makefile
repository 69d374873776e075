# make demo: set up .venv and fine-tune the embedded SmolLM2 on the built-in task (CPU, ~5 min: ~1.5 to set up, 2-3.5 to train and evaluate)
# make test: set up .venv, lint (ruff, mypy) and run the test suite (what .ci/run calls)
VENV ?= .venv
PYTHON ?= python3

.PHONY: demo test setup lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(VENV)/bin/tunewise train examples/quickstart.yaml

test: lint
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy src/tunewise
