# tcae-ldm: `make demo` runs the CPU demo on the embedded photos, `make test` runs the suite,
# `make compare-demo` answers TC-AE vs DC-AE in miniature, `make bench` measures cost and speed.
# Each creates .venv on first use and installs the package with the extras it needs: `demo` (the photographs'
# packages) for the demo and the benchmark, `test` (which includes `demo`) for the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
RUNS   ?= runs/demo
# Nothing downloads at run time: models come from local caches or are random in tests.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install test test-fast fid-demo demo compare-demo bench mutate clean distclean

$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$*]"
	touch $@

install: $(TEST_STAMP)

test: $(TEST_STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q

test-fast: $(TEST_STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q -m "not slow"

# ---------------------------------------------------------------------------------------------------------------
# CPU demo on the embedded photos. Each step leaves a marker (.done, or the cache's metadata.json, written last),
# so a rerun skips the steps that are newer than their configs and inputs; `rm -rf runs/demo` starts over.
#   make demo          TC-AE -> its report -> latent cache -> DiT (with the gFID-proxy curve) -> samples
#   make compare-demo  the same chain for a DC-AE trained with the same losses and budget, then `tcae-ldm compare`
# ---------------------------------------------------------------------------------------------------------------
FID      := $(RUNS)/fid
FEATURES := $(FID)/demo-classifier.pt
FID_REF  := $(FID)/demo_train_demo-classifier.npz
TCAE_AE  := $(RUNS)/tcae/.done
DCAE_AE  := $(RUNS)/dcae/.done

# With a CUDA device each step adds its overlay from configs/demo/gpu/ (bf16, larger models, more data, same
# minutes); DEMO_DEVICE=cpu keeps the CPU demo on a GPU machine. Decided when the step runs, once the venv exists.
DEMO_DEVICE ?= auto
gpu_overlay = $$(test "$(DEMO_DEVICE)" != cpu && $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && echo "--config configs/demo/gpu/$(1).yaml")

# The offline FID proxy: a small classifier of the 8 photos (rfid_/gfid_demo-classifier) and the train crops' stats.
$(FEATURES): | $(DEMO_STAMP)
	$(OFFLINE) $(BIN)/tcae-ldm train-demo-classifier --out $@
$(FID_REF): $(FEATURES)
	$(OFFLINE) $(BIN)/tcae-ldm fid-stats --demo --split train --features demo-classifier --weights $(FEATURES) --out $@

# Autoencoders: train, then compare with the bicubic baseline at the same float budget.
$(RUNS)/%/.done: configs/demo/%.yaml $(FEATURES) | $(DEMO_STAMP)
	$(OFFLINE) $(BIN)/tcae-ldm fit --config configs/demo/$*.yaml $(call gpu_overlay,$*)
	$(OFFLINE) $(BIN)/tcae-ldm ae-report --ckpt $(RUNS)/$*/checkpoints/last.ckpt --out $(RUNS)/$* --image-size 64 \
		--features demo-classifier --weights $(FEATURES)
	touch $@

# Latent caches of the training crops and their flips.
$(RUNS)/latents_%/metadata.json: configs/demo/cache_latents_%.yaml $(RUNS)/%/.done
	$(OFFLINE) $(BIN)/tcae-ldm predict --config configs/demo/cache_latents_$*.yaml $(call gpu_overlay,cache_latents_$*)

# The same DiT on each cache, logging gen/gfid_demo-classifier every 200 steps; then a final sample grid.
# The DC-AE run is an overlay of the TC-AE one that changes only the cache and the run's name.
DIT_CONFIGS_tcae := configs/demo/dit_on_tcae.yaml
DIT_CONFIGS_dcae := configs/demo/dit_on_tcae.yaml configs/demo/dit_on_dcae.yaml
.SECONDEXPANSION:
$(RUNS)/dit_%/.done: $$(DIT_CONFIGS_$$*) $(RUNS)/latents_%/metadata.json $(FID_REF)
	$(OFFLINE) $(BIN)/tcae-ldm fit $(foreach c,$(DIT_CONFIGS_$*),--config $(c)) $(call gpu_overlay,dit_on_tcae)
	$(OFFLINE) $(BIN)/tcae-ldm sample --ckpt $(RUNS)/dit_$*/checkpoints/last.ckpt --out $(RUNS)/dit_$*/samples_final --num 64
	touch $@

# Markers and caches are results, not intermediates: make must never delete them.
.SECONDARY:

fid-demo: $(FID_REF)

demo: $(RUNS)/dit_tcae/.done

compare-demo: $(RUNS)/dit_tcae/.done $(RUNS)/dit_dcae/.done
	$(OFFLINE) $(BIN)/tcae-ldm compare $(RUNS)/dit_dcae $(RUNS)/dit_tcae --baseline dit_dcae --out $(RUNS)/compare

# Cost and throughput of TC-AE vs DC-AE (and the DiT on their latents), measured side by side.
bench: $(DEMO_STAMP)
	$(OFFLINE) $(BIN)/tcae-ldm bench --out $(RUNS)/bench.json

# Mutation testing (not in CI) of the arithmetic the comparison rests on, with the fast tests that cover it (the
# [tool.mutmut] section of pyproject.toml). One module at a time, one process: MUTATE_MODULES=lit.schedules picks
# some, MUTATE_JOBS=2 uses two cores; reruns skip the mutants already judged. docs/testing.md has the scores.
MUTATE_MODULES ?= lit.schedules losses.ibot losses.masking losses.reconstruction diffusion.flow diffusion.ddpm \
	metrics.fid metrics.convergence latents.cache.x?LatentNormalizer? latents.cache.x_read_stats \
	latents.cache.x__channel_sums latents.cache.x_finish_cache data.views
MUTATE_JOBS ?= 1
mutate: $(TEST_STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test,mutate]"
	for m in $(MUTATE_MODULES); do \
		OMP_NUM_THREADS=1 $(OFFLINE) $(BIN)/mutmut run --max-children $(MUTATE_JOBS) "tcae_ldm.$$m*" || exit 1; done
	$(BIN)/mutmut results

# clean removes what the demo targets wrote ($(RUNS)) and nothing else of runs/ (paper-scale runs live beside it);
# distclean also removes the virtual environment.
clean:
	rm -rf $(RUNS)

distclean: clean
	rm -rf $(VENV) .pytest_cache
