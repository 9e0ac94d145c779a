# Two entry points (README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use: torch==2.13.0 (CPU build) first, then the project, so
# pip never resolves torch to a multi-GB CUDA build.
# DALI comes from the `cuda13` extra: its CPU pipeline (what a machine without a GPU runs)
# is in both DALI wheels, and cuda130 is the smaller one; a CUDA 12 GPU machine installs
# '.[dev,cuda12]' instead (README).
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test install clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,cuda13]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	.venv/bin/echofm demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf demo_out runs .pytest_cache
