# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make demo   install into .venv and start the Gradio demo (http://127.0.0.1:7860)
#   make test   install into .venv (+ Debian's chromium for the browser tests) and run every test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lab figures browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) app.py $(ARGS)

browser:
	bash scripts/install_chromium.sh

test: $(STAMP) browser
	MPLBACKEND=Agg $(PY) -m pytest $(PYTEST_ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

# the README pictures (docs/images/*.png) from the shipped checkpoint, or ARGS="--checkpoint FILE"
figures: $(STAMP)
	$(PY) scripts/make_readme_figures.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
