# tcae-ldm: `make demo` runs the CPU demo on the embedded photos, `make test` runs the suite.
# Both create .venv on first use and install the package with its test extras.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
RUNS   ?= runs/demo
# Nothing downloads at run time: models come from local caches or are random in tests.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q -m "not slow"

# The whole chain on CPU: TC-AE -> its report -> latent cache -> DiT -> samples.
demo: $(STAMP)
	$(OFFLINE) $(BIN)/tcae-ldm fit --config configs/demo/tcae.yaml
	$(OFFLINE) $(BIN)/tcae-ldm ae-report --ckpt $(RUNS)/tcae/checkpoints/last.ckpt --out $(RUNS)/tcae
	$(OFFLINE) $(BIN)/tcae-ldm predict --config configs/demo/cache_latents_tcae.yaml
	$(OFFLINE) $(BIN)/tcae-ldm fit --config configs/demo/dit_on_tcae.yaml
	$(OFFLINE) $(BIN)/tcae-ldm sample --ckpt $(RUNS)/dit_tcae/checkpoints/last.ckpt --out $(RUNS)/dit_tcae/samples_final --num 64

# Cost and throughput of TC-AE vs DC-AE (and the DiT on their latents), measured side by side.
bench: $(STAMP)
	$(OFFLINE) $(BIN)/tcae-ldm bench --out $(RUNS)/bench.json

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
