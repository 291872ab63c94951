# Two commands do all the set-up on a fresh machine (see README):
#   make run    install into .venv, then run the main job
#   make test   install into .venv, then run the test suite (make test-fast: without the slow tests)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run demo bento test test-fast bench lint clean model soak

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,eval]'
	touch $@

# The main job: serve the shipped default model on http://127.0.0.1:3000 (Ctrl-C stops it).
HOST ?= 127.0.0.1
PORT ?= 3000
run: install
	$(PY) -m service.store
	$(VENV)/bin/bentoml serve service.service:FaCTService --host $(HOST) --port $(PORT)

demo: install
	$(PY) -m fact_model.demo

bento: install
	$(PY) -m service.store
	$(VENV)/bin/bentoml build

test: install
	$(PY) -m pytest -q

# The inner loop (under 2 minutes): everything but the tests marked slow (servers, pipelines, load runs).
test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) -m benchmarks.explain

# Soak (not in CI): 10 minutes at about half the sustainable mixed rate (6 users × 4 tasks/s ≈ 24 req/s),
# with per-minute req/s, p50/p95/p99 and server RSS in runs/soak/summary.json (docs/LOAD.md).
soak: install
	loadtests/run --users 6 --spawn-rate 6 --duration 10m --mix mixed --throughput 4 --sample-every 60 --out runs/soak

# Reproduce the shipped default model (fact_model/weights/default) from scratch with the fact CLI.
DEFAULT_RUN := runs/default
model: install
	rm -rf $(DEFAULT_RUN)
	$(VENV)/bin/fact train backbone --data synthetic --epochs 4 --seed 0 --out $(DEFAULT_RUN)/backbone
	$(VENV)/bin/fact train concepts --data synthetic --model $(DEFAULT_RUN)/backbone/model \
		--layer layer3:256:8 --layer layer2:128:8 --epochs 12 --seed 0 --out $(DEFAULT_RUN)/concepts
	$(VENV)/bin/fact stats --data synthetic --model $(DEFAULT_RUN)/concepts/model
	$(VENV)/bin/fact evaluate --data synthetic --model $(DEFAULT_RUN)/concepts/model --out $(DEFAULT_RUN)/evaluation
	rm -rf fact_model/weights/default.new
	mkdir -p fact_model/weights
	cp -r $(DEFAULT_RUN)/concepts/model fact_model/weights/default.new
	cp $(DEFAULT_RUN)/evaluation/evaluation.json $(DEFAULT_RUN)/evaluation/evaluation.md fact_model/weights/default.new/
	rm -rf fact_model/weights/default && mv fact_model/weights/default.new fact_model/weights/default

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
