# `make demo` and `make test` each create .venv on first use and install psdclip into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# clip-retrieval's own ClipClient, for the compatibility test: its package pins numpy<2 and open_clip<3,
	# so only its files go in (no dependencies), beside the venv; the test imports clip_client.py alone
	$(BIN)/pip install -q --no-deps --target $(VENV)/clip-retrieval 'clip-retrieval==2.45.0' \
		|| echo "clip-retrieval not installed: the ClipClient test will be skipped"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/psdclip demo --out demo-out

# pytest's exit code 5 (no test collected) is not a failure of the suite itself
test: $(STAMP)
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf $(VENV) demo-out build *.egg-info
