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
#   make demo          TC-AE -> decoder finetuning -> its report -> latent cache -> DiT (gFID-proxy curve) -> samples
#   make compare-demo  the same chain for a DC-AE trained with the same losses and budget at 3x TC-AE's
#                      encode + decode GMACs (the paper's pair: 3.7x), DiTs of 3 seeds on each cache, then `tcae-ldm compare`
# A step that make reruns (its config or inputs changed) starts its run folder over (--overwrite_run true; the old
# metrics.csv is kept as metrics-<time>.csv); `tcae-ldm fit` alone refuses to.
# ---------------------------------------------------------------------------------------------------------------
FID      := $(RUNS)/fid
FEATURES := $(FID)/demo-classifier.pt
FID_REF  := $(FID)/demo_train_demo-classifier.npz

# With a CUDA device each step adds its overlay from configs/demo/gpu/ (bf16, larger models, more data, same
# minutes); DEMO_DEVICE=cpu keeps the CPU demo on a GPU machine. Decided when the step runs, once the venv exists.
DEMO_DEVICE ?= auto
gpu_overlay = $$(test "$(DEMO_DEVICE)" != cpu && $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && echo "--config configs/demo/gpu/$(1).yaml")

# The offline FID proxy: a small classifier of the 8 photos (rfid_/gfid_demo-classifier) and the train crops' stats.
$(FEATURES): | $(DEMO_STAMP)
	$(OFFLINE) $(BIN)/tcae-ldm train-demo-classifier --out $@
$(FID_REF): $(FEATURES)
	$(OFFLINE) $(BIN)/tcae-ldm fid-stats --demo --split train --features demo-classifier --weights $(FEATURES) --out $@

# Autoencoders, phase 1: joint training (the DC-AE with the same losses, without iBOT).
$(RUNS)/%/.done: configs/demo/%.yaml $(FEATURES) | $(DEMO_STAMP)
	$(OFFLINE) $(BIN)/tcae-ldm fit --config configs/demo/$*.yaml $(call gpu_overlay,$*) --overwrite_run true
	touch $@

# Phase 2: decoder finetuning, encoder frozen, the same steps for both; the finetuned autoencoder is the one that
# decodes the DiT's samples, so it is the one reported, against the bicubic baseline at the same float budget.
FT_CONFIGS_tcae := configs/demo/tcae_decoder_ft.yaml
FT_CONFIGS_dcae := configs/demo/tcae_decoder_ft.yaml configs/demo/dcae_decoder_ft.yaml
.SECONDEXPANSION:
$(RUNS)/tcae_decoder_ft/.done $(RUNS)/dcae_decoder_ft/.done: $(RUNS)/%_decoder_ft/.done: $$(FT_CONFIGS_$$*) $(RUNS)/%/.done
	$(OFFLINE) $(BIN)/tcae-ldm fit $(foreach c,$(FT_CONFIGS_$*),--config $(c)) \
		$(foreach c,$(FT_CONFIGS_$*),$(call gpu_overlay,$(basename $(notdir $(c))))) --overwrite_run true
	$(OFFLINE) $(BIN)/tcae-ldm ae-report --ckpt $(RUNS)/$*_decoder_ft/checkpoints/last.ckpt --out $(RUNS)/$*_decoder_ft \
		--image-size 64 --features demo-classifier --weights $(FEATURES)
	touch $@

# Latent caches of the training crops and their flips, by the finetuned autoencoders.
$(RUNS)/latents_%/metadata.json: configs/demo/cache_latents_%.yaml $(RUNS)/%_decoder_ft/.done
	$(OFFLINE) $(BIN)/tcae-ldm predict --config configs/demo/cache_latents_$*.yaml $(call gpu_overlay,cache_latents_$*)

# The same DiT on each cache, logging gen/gfid_demo-classifier every 200 steps; then a final sample grid. A run
# is dit_<autoencoder> (seed 0) or dit_<autoencoder>_seed<N>: the seed is the only difference between them, so
# `compare` pools them into one group. The DC-AE run is an overlay of the TC-AE one that changes only the cache
# and the run's name.
DIT_SEEDS ?= 0 1 2
DIT_CONFIGS_tcae := configs/demo/dit_on_tcae.yaml
DIT_CONFIGS_dcae := configs/demo/dit_on_tcae.yaml configs/demo/dit_on_dcae.yaml
DIT_GPU_tcae := dit_on_tcae
DIT_GPU_dcae := dit_on_tcae dit_on_dcae
dit_ae   = $(firstword $(subst _seed, ,$(1)))
dit_seed = $(or $(word 2,$(subst _seed, ,$(1))),0)
dit_runs = $(foreach s,$(DIT_SEEDS),$(RUNS)/dit_$(1)$(if $(filter-out 0,$(s)),_seed$(s)))
$(RUNS)/dit_%/.done: $$(DIT_CONFIGS_$$(call dit_ae,$$*)) $(RUNS)/latents_$$(call dit_ae,$$*)/metadata.json $(FID_REF)
	$(OFFLINE) $(BIN)/tcae-ldm fit $(foreach c,$(DIT_CONFIGS_$(call dit_ae,$*)),--config $(c)) \
		$(foreach g,$(DIT_GPU_$(call dit_ae,$*)),$(call gpu_overlay,$(g))) \
		--seed_everything $(call dit_seed,$*) --trainer.logger.init_args.name dit_$* --overwrite_run true
	$(OFFLINE) $(BIN)/tcae-ldm sample --ckpt $(RUNS)/dit_$*/checkpoints/last.ckpt --out $(RUNS)/dit_$*/samples_final --num 64
	touch $@

# Markers and caches are results, not intermediates: make must never delete them.
.SECONDARY:

fid-demo: $(FID_REF)

demo: $(RUNS)/dit_tcae/.done

# Every seed of both DiTs, then one table: per autoencoder the mean and spread over seeds, speed-ups with intervals.
compare-demo: $(addsuffix /.done,$(call dit_runs,tcae) $(call dit_runs,dcae))
	$(OFFLINE) $(BIN)/tcae-ldm compare $(call dit_runs,dcae) $(call dit_runs,tcae) --baseline dit_dcae --out $(RUNS)/compare

# Cost and throughput of TC-AE vs DC-AE (and the DiT on their latents), measured side by side.
bench: $(DEMO_STAMP)
	$(OFFLINE) $(BIN)/tcae-ldm bench --out $(RUNS)/bench.json

# Mutation testing (not in CI) of the arithmetic the comparison rests on, with the fast tests that cover it (the
# [tool.mutmut] section of pyproject.toml). One mutmut run for all of them (its test listing and clean run cost
# minutes each): MUTATE_MODULES=lit.schedules picks some, MUTATE_JOBS=2 uses two cores; reruns skip the mutants
# already judged (delete mutants/ after changing tests). docs/testing.md has the scores.
MUTATE_MODULES ?= lit.schedules losses.ibot losses.masking losses.reconstruction diffusion.flow diffusion.ddpm \
	metrics.fid metrics.convergence latents.cache.x?LatentNormalizer? latents.cache.x_read_stats \
	latents.cache.x__channel_sums latents.cache.x_finish_cache data.views
MUTATE_JOBS ?= 1
mutate: $(TEST_STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test,mutate]"
	OMP_NUM_THREADS=1 $(OFFLINE) $(BIN)/mutmut run --max-children $(MUTATE_JOBS) \
		$(foreach m,$(MUTATE_MODULES),"tcae_ldm.$(m)*")
	$(BIN)/mutmut results

# clean removes what the demo targets wrote ($(RUNS)) and nothing else of runs/ (paper-scale runs live beside it);
# distclean also removes the virtual environment.
clean:
	rm -rf $(RUNS)

distclean: clean
	rm -rf $(VENV) .pytest_cache
