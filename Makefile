# `make demo` and `make test` work on a fresh machine with Python 3.11+: both create
# .venv when it is missing or pyproject.toml changed, then do their one thing.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test docs bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gtrain fit quickstart

# Bytecode is cached even where the environment asks Python not to: the suite starts about
# a hundred gtrain processes, and each would compile gtrain's sources again.
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(VENV)/bin/python -m pytest -q

# Rewrites the generated parts of README.md (the recipe reference) from the code.
docs: $(STAMP)
	$(VENV)/bin/python -m tests.test_docs

clean:
	rm -rf $(VENV) runs
