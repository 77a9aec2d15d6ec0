# make test   ruff + pytest (creates .venv and installs requirements.txt if needed)
# make demo   the whole RSA pipeline on the toy world, into runs/demo
# make readme  paste the demo's table into README.md (make check-readme: fail when they differ)
# make study  RSA against SACPO and TDPO at matched helpfulness, and the dual loop against RSA(P); toy world, 5 seeds (not in CI)
# make study-tail  the tail study (docs/study/plan.md): risk-averse against risk-neutral safety stages in the quiet, gamble and heavy worlds (resumable; not in CI)
# make smoke-gpu   one CUDA GPU: the toy pipeline in bf16 and 4-bit, a random 1B model's step speed and memory, --deterministic twice (stops without CUDA)
# make bench  speed and memory of the risk terms and a training step; make bench-memory: the memory plan against measured peaks
# make theory  both stages trained on the enumerable world against their optima and the dual loops (docs/theory.md, about 20 min)
# make study-real  the Ra-DPO HH experiment in miniature on SmolLM2-135M-Instruct (1 h 52 min measured here; not in CI)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test lint install demo readme check-readme study study-tail study-real theory smoke-gpu bench bench-memory

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	PY=$(PY) bash demo/run.sh

readme: $(STAMP)
	$(PY) -m demo.readme_table

check-readme: demo
	$(PY) -m demo.readme_table --check

study: $(STAMP)
	$(PY) -m studies.matched --out runs/study --jobs 2

study-tail: $(STAMP)
	$(PY) -m studies.tail --parts A B C E D --jobs 2
	$(PY) -m studies.tail --collect --parts A B C E
	$(PY) -m studies.tail --report

theory: $(STAMP)
	$(PY) -m studies.theory --out runs/theory

study-real: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-real.txt
	$(PY) -m studies.real --out runs/study-real

smoke-gpu: $(STAMP)
	$(PY) -m bench.smoke_gpu --out runs/smoke-gpu

bench: $(STAMP)
	$(PY) -m bench

bench-memory: $(STAMP)
	$(PY) -m bench --memory_plan
