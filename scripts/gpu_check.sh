#!/usr/bin/env bash
# GPU check, sized to fit one short device lease:
#   1. `tcae-ldm bench` at paper scale (TC-AE-B/p8-c128 staged and vanilla, DC-AE f32c32 at 256x256;
#      DiT-XL/1 and DiT-B/1 on their latents; the input pipelines), bf16, a few repeats;
#   2. a short bf16-mixed fit of the demo autoencoder on every visible GPU (GAN step included), a latent cache
#      of it, and a short bf16-mixed DiT fit on that cache on every visible GPU;
#   3. with the time left, the torch.compile speed-ups of TC-AE-B, DC-AE and DiT-B/1.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default ./gpu_check). Environment: PYTHON (default python),
# PRECISIONS (default bf16), REPEATS (default 3), BUDGET_S (default 285: total seconds for all steps).
set -uo pipefail
OUT=${1:-./gpu_check}
PY=${PYTHON:-python}
PRECISIONS=${PRECISIONS:-bf16}
REPEATS=${REPEATS:-3}
BUDGET=${BUDGET_S:-285}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the script runs from the repository root
cd "$(dirname "$0")/.."
# Nothing may download: random weights for DC-AE, no pretrained LPIPS in the demo config.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if ! "$PY" - > "$OUT/env.txt" 2>&1 <<'PYEOF'
import diffusers, lightning, timm, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__,
      "lightning", lightning.__version__, "timm", timm.__version__)
assert torch.cuda.is_available(), "no CUDA device visible"
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i))
PYEOF
then
    log "FAIL: environment check (see env.txt)"; cat "$OUT/env.txt"; exit 2
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
log "$(head -1 "$OUT/env.txt"); $NGPU GPU(s)"

# 1. paper-scale benchmark
timeout $(( $(left) - 100 )) "$PY" -m tcae_ldm.cli bench --precisions "$PRECISIONS" --repeats "$REPEATS" \
    --out "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
BENCH_RC=$?
log "bench rc=$BENCH_RC ($OUT/bench.txt, $OUT/bench.json)"
grep -v "Warning" "$OUT/bench.txt" | tail -n 60

# 2. short bf16 fit on all visible GPUs (skipped when the demo config is absent)
FIT_RC=skipped
if [ -f configs/demo/tcae.yaml ]; then
    STRATEGY=()
    # the autoencoder has parameters a step may not use (mask token): DDP must be told
    [ "$NGPU" -gt 1 ] && STRATEGY=(--trainer.strategy=ddp_find_unused_parameters_true)
    timeout $(( $(left) > 150 ? 150 : $(left) )) "$PY" -m tcae_ldm.cli fit --config configs/demo/tcae.yaml \
        --trainer.accelerator=gpu --trainer.devices=-1 --trainer.precision=bf16-mixed ${STRATEGY[@]+"${STRATEGY[@]}"} \
        --model.init_args.max_steps=40 --model.init_args.loss.disc_start=10 --model.init_args.metrics_fid=null \
        --trainer.logger.init_args.save_dir="$OUT/fit" \
        --trainer.callbacks.init_args.dirpath="$OUT/fit/checkpoints" > "$OUT/fit.txt" 2>&1
    FIT_RC=$?
    if [ "$FIT_RC" = 0 ] && [ ! -f "$OUT/fit/tcae/metrics.csv" ]; then FIT_RC="no metrics.csv"; fi
    log "fit rc=$FIT_RC ($OUT/fit.txt, $OUT/fit/tcae/metrics.csv)"
    tail -n 5 "$OUT/fit.txt"
fi

# 2b. its latent cache (one GPU is plenty) and a short bf16 DiT fit on all visible GPUs
DIT_RC=skipped
DIT_STRATEGY=()
[ "$NGPU" -gt 1 ] && DIT_STRATEGY=(--trainer.strategy=ddp)  # every DiT parameter gets a gradient
if [ "$FIT_RC" = 0 ] && [ "$(left)" -gt 90 ]; then
    timeout 60 "$PY" -m tcae_ldm.cli predict --config configs/demo/cache_latents_tcae.yaml \
        --trainer.accelerator=gpu --trainer.devices=1 --trainer.default_root_dir="$OUT/cache" \
        --model.init_args.autoencoder.path="$OUT/fit/tcae/checkpoints/last.ckpt" \
        --trainer.callbacks.init_args.output_dir="$OUT/latents" > "$OUT/cache.txt" 2>&1 \
    && timeout $(( $(left) > 120 ? 90 : $(left) - 30 )) "$PY" -m tcae_ldm.cli fit --config configs/demo/dit_on_tcae.yaml \
        --trainer.accelerator=gpu --trainer.devices=-1 --trainer.precision=bf16-mixed ${DIT_STRATEGY[@]+"${DIT_STRATEGY[@]}"} \
        --trainer.max_steps=60 --data.init_args.cache_dir="$OUT/latents" --trainer.logger.init_args.save_dir="$OUT/fit" \
        --trainer.callbacks="[{\"class_path\": \"lightning.pytorch.callbacks.ModelCheckpoint\", \"init_args\": {\"dirpath\": \"$OUT/fit/dit_tcae/checkpoints\", \"save_last\": true, \"save_top_k\": 0}}]" \
        > "$OUT/dit.txt" 2>&1
    DIT_RC=$?
    if [ "$DIT_RC" = 0 ] && [ ! -f "$OUT/fit/dit_tcae/metrics.csv" ]; then DIT_RC="no metrics.csv"; fi
    log "cache + DiT fit rc=$DIT_RC ($OUT/cache.txt, $OUT/dit.txt, $OUT/fit/dit_tcae/metrics.csv)"
    tail -n 5 "$OUT/dit.txt"
fi

# 3. torch.compile speed-ups, only in the time that is left
COMPILE_RC=skipped
if [ "$(left)" -gt 60 ]; then
    timeout $(( $(left) - 5 )) "$PY" -m tcae_ldm.cli bench --compile --precisions bf16 --repeats "$REPEATS" \
        --autoencoders TC-AE-B/p8-c128,DC-AE/f32c32 --dits DiT-B/1 --out "$OUT/bench_compile.json" \
        > "$OUT/bench_compile.txt" 2>&1
    COMPILE_RC=$?
    [ "$COMPILE_RC" = 124 ] && COMPILE_RC="124 (out of time; raise BUDGET_S)"
    log "compile bench rc=$COMPILE_RC ($OUT/bench_compile.txt)"
    grep -A 8 "torch.compile speed-up" "$OUT/bench_compile.txt"
fi

log "done: bench=$BENCH_RC fit=$FIT_RC dit=$DIT_RC compile=$COMPILE_RC"
[ "$BENCH_RC" = 0 ] && { [ "$FIT_RC" = 0 ] || [ "$FIT_RC" = skipped ]; } && { [ "$DIT_RC" = 0 ] || [ "$DIT_RC" = skipped ]; }
