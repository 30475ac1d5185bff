# The two commands a new user needs: `make demo` (the main job) and `make test`. Both build .venv in the
# repository root from scratch on first use; the CPU build of torch is pinned through constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= train,index,serve,eval,onnx,ray,media,dev

.PHONY: setup test demo lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0 -e ".[$(EXTRAS)]"
	# clip-retrieval's client is the reference the service's compatibility test talks to; its package
	# declares its whole back end (a CUDA torch among it) as dependencies, and the client needs only requests.
	$(PY) -m pip install --quiet --no-deps clip-retrieval==2.45.0
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench

demo: setup
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache
