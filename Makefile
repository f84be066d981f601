# The README's commands. Each builds .venv (pinned torch / torchvision, test extras) when it is missing.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.fastvit-installed

.PHONY: demo test bench bench-rehearsal inspect clean

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e ".[pinned]"
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m fastvit demo

test: $(STAMP)
	$(PYTHON) -m pytest -n 2 --dist loadfile -q tests/

bench: $(STAMP)
	$(PYTHON) -m pytest benchmarks/

bench-rehearsal: $(STAMP)
	$(PYTHON) -m pytest benchmarks/ --rehearse -q -p no:cacheprovider

inspect: $(STAMP)
	$(PYTHON) -m fastvit.inspect --arch sm_90 --arch sm_80 --format table

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
