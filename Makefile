# The two commands of the README. Both build the virtualenv from nothing: torch first (the CPU
# wheel pinned in setup.cfg), then the project with its dev extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast test-oldest-torch lint bench clean wheelhouse

$(STAMP): setup.cfg pyproject.toml
	@echo "install: [1/4] a virtualenv in $(VENV)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "install: [2/4] torch 2.13.0 (CPU wheel, ~200 MB)"
	$(PY) -m pip install torch==2.13.0
	@echo "install: [3/4] the project and its dev extras (megatron-core, deepspeed, lm-eval, ...: a few minutes)"
	$(PY) -m pip install -e '.[dev]'
	# transformers 5.x beside the dev extras' 4.56 (the Ouro release's), for the export tests; its own
	# huggingface-hub lives in that directory too, so pip's check against the main env is moot
	@echo "install: [4/4] transformers 5.x beside 4.56 in $(VENV)/transformers5 (the export tests)"
	$(PY) -m pip install -q --no-warn-conflicts --target $(VENV)/transformers5 'transformers>=5,<6'
	touch $(STAMP)
	@echo "install: done; \`source $(VENV)/bin/activate\` puts \`pretrain\` on PATH"

install: $(STAMP)

# Air-gapped nodes: every dependency but torch (the node's own, e.g. an NGC container's), at the
# versions tested in .venv, as wheels for this Python and platform (run it on a machine that
# matches the nodes: the same container, or the same Python on x86_64/aarch64). On the node:
#   pip install --no-index --find-links wheelhouse -e '.[dev]'
# A short GPU lease carries only what its image lacks: ONLY names those distributions (as pip
# freeze spells them), PYTHON the image's Python (e.g. 3.12) -- binary wheels for it, no deps:
#   make wheelhouse PYTHON=3.12 ONLY="megatron-core webdataset braceexpand zstandard"
WHEELHOUSE ?= wheelhouse
ONLY ?=
PYTHON ?=
wheelhouse: install
	mkdir -p $(WHEELHOUSE)
ifeq ($(ONLY),)
	$(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-)' > $(WHEELHOUSE)/requirements.txt
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -r $(WHEELHOUSE)/requirements.txt -w $(WHEELHOUSE)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(WHEELHOUSE) setuptools wheel
else
	$(PY) -m pip freeze --exclude-editable | grep -iE '^($(subst $() ,|,$(strip $(ONLY))))==' > $(WHEELHOUSE)/requirements.txt
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d $(WHEELHOUSE) \
		$(if $(PYTHON),--python-version $(PYTHON) --platform manylinux_2_28_$(shell uname -m) \
		--platform manylinux2014_$(shell uname -m) --platform manylinux_2_17_$(shell uname -m)) \
		-r $(WHEELHOUSE)/requirements.txt
	@du -sh $(WHEELHOUSE)
endif

# The demo: a byte-level BPE trained on the bundled text, webdataset shards, then training on
# 2 ranks (megatron-core tensor + sequence parallelism, gloo on CPU) with the streaming loader.
demo: install
	@echo "demo: starting afresh in $(DEMO_DIR) (an earlier demo run there is removed)"
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/pretrain data train-tokenizer --input data/sample.txt --vocab-size 512 \
		--output $(DEMO_DIR)/data/tokenizer.json
	$(VENV)/bin/pretrain data tokenize --input data/sample.txt \
		--tokenizer $(DEMO_DIR)/data/tokenizer.json --output $(DEMO_DIR)/data/shards \
		--shard-tokens 2048 --chunk-tokens 256
	$(VENV)/bin/pretrain data tokenize --input data/validation.txt \
		--tokenizer $(DEMO_DIR)/data/tokenizer.json --output $(DEMO_DIR)/data/validation \
		--shard-tokens 2048 --chunk-tokens 256
	OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore $(VENV)/bin/torchrun --nproc_per_node=2 \
		--master_port=$${DEMO_PORT:-29500} -m pretrain.cli train --config configs/tiny.yaml \
		train.out_dir=$(DEMO_DIR) parallel.tensor=2 parallel.sequence_parallel=true \
		data.source=shards 'data.sources=[{path: $(DEMO_DIR)/data/shards}]' \
		data.tokenizer=$(DEMO_DIR)/data/tokenizer.json model.vocab_size=512 \
		'data.validation=[{path: $(DEMO_DIR)/data/validation}]'

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q -rs

# the edit-run loop: every in-process test (no torchrun, SLURM or training subprocess) but the
# fuzz tier (pytest -m fuzz)
test-fast: install lint
	$(PY) -m pytest -q -rs -m "not multiproc and not slurm and not slow and not fuzz"

# the fast tier on the oldest supported torch (2.9.1), in .venv-torch2.9.1 (CI runs it too)
test-oldest-torch: install
	bash .ci/oldest_torch.sh

bench: install
	$(PY) -m bench.overhead
	$(PY) -m bench.data_throughput
	$(PY) -m bench.data_throughput --array
	$(PY) -m bench.comm_volume
	$(PY) -m bench.pipeline_bubble
	$(PY) -m bench.zero_memory
	$(PY) -m bench.checkpoint_io
	$(PY) -m bench.loop_modes prepare
	$(PY) -m bench.loop_modes run --only ouro-R1 ouro-R4 flt-K1 lt_ia-K4-all --tokens 500000

clean:
	rm -rf $(VENV) .venv-torch* runs $(WHEELHOUSE)
