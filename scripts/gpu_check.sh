#!/usr/bin/env bash
# GPU check: one prepared script for a short device lease (default budget 540 s, under a 10-minute command limit).
# Every step runs under its own timeout and share of the budget; a step that fails or runs out of time is reported
# and the others still run. Figures land in OUT_DIR, and figures.txt sums them up:
#   1. bench.txt/.json       paper scale: TC-AE-B/p8-c128 (staged, vanilla) vs DC-AE f32c32 at 256x256 (encode, decode,
#                            training step: images/s, the TC-AE/DC-AE ratio round by round, MFU, peak memory, a per-op
#                            profile), DiT-XL/1 and DiT-B/1 training steps on their latents, the loaders, and the
#                            ImageNet JPEG pipelines per worker on this machine's cores (with the device colour path)
#   2. joint.txt/.json       one joint TC-AE + iBOT training step of configs/tcae.yaml taken apart, pass by pass
#   3. fit/tcae/             bf16-mixed training steps of the demo autoencoder (iBOT, GAN, colour ops on the device)
#                            under DDP on every visible GPU
#   4. latents/, fit/dit_tcae/  its latent cache, then bf16-mixed DiT training steps under DDP on every visible GPU
#   5. samples/, export/     `tcae-ldm sample` on every visible GPU, and `tcae-ldm export` of both runs
#   6. bench_compile.txt     with the time left: torch.compile speed-ups and the compiled TC-AE/DC-AE ratio
# Usage: scripts/gpu_check.sh [--tiny] [OUT_DIR]   (default OUT_DIR ./gpu_check)
#   --tiny  a dry run of every command above on the CPU with tiny presets (DDP as 2 gloo processes), to check the
#           script before a lease. Environment: PYTHON (default python), BUDGET_S (default 540), REPEATS (default 3).
set -uo pipefail
TINY=0
if [ "${1:-}" = "--tiny" ]; then TINY=1; shift; fi
OUT=${1:-./gpu_check}
PY=${PYTHON:-python}
REPEATS=${REPEATS:-3}
BUDGET=${BUDGET_S:-540}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the script runs from the repository root
cd "$(dirname "$0")/.."
# Nothing may download: random weights for DC-AE, no pretrained LPIPS or FID network in the demo runs.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
declare -A RC

# step NAME SECONDS LOG -- COMMAND...: run COMMAND under min(SECONDS, time left - 10 s), output to OUT/LOG
step() {
    local name=$1 want=$2 out=$3; shift 4
    local limit=$(( $(left) - 10 ))
    [ "$want" -lt "$limit" ] && limit=$want
    if [ "$limit" -lt 20 ]; then RC[$name]="skipped (out of time)"; log "$name: skipped, $(left) s left"; return; fi
    log "$name: up to ${limit}s -> $out"
    timeout "$limit" "$@" > "$OUT/$out" 2>&1
    local rc=$?
    [ "$rc" = 124 ] && rc="124 (out of time)"
    RC[$name]=$rc
    log "$name: rc=$rc"
}
TCAE=("$PY" -m tcae_ldm.cli)  # timeout runs programs, not shell functions

if [ "$TINY" = 1 ]; then
    ACCEL=(--trainer.accelerator=cpu --trainer.devices=2)  # DDP over 2 gloo processes
    NGPU=0
    BENCH=(--tiny --device cpu --repeats 2)
    JOINT=(--joint-step --tiny --device cpu --repeats 2)
    COMPILE=(--tiny --device cpu --repeats 2 --modes encode,decode --dits DiT-T/1 --skip-jpeg)
    AE_NET=TC-AE-T/p4-c16; SIZE=32
    AE_TINY=(--model.init_args.net=TC-AE-T/p4-c16 "--model.init_args.net_args={image_size: 32, latent_size: 2}"
             --model.init_args.loss.disc_channels=8 --model.init_args.loss.disc_layers=2
             --data.init_args.image_size=32 --data.init_args.train_per_class=2 --data.init_args.val_per_class=1
             --data.init_args.global_batch_size=8 --model.init_args.max_steps=2 --model.init_args.loss.disc_start=1)
    CACHE_TINY=(--data.init_args.images.init_args.image_size=32 --data.init_args.images.init_args.train_per_class=2
                --data.init_args.images.init_args.val_per_class=1 --data.init_args.batch_size=8)
    DIT_TINY=(--model.init_args.dit=DiT-T/1 --data.init_args.global_batch_size=8 --trainer.max_steps=3)
    SAMPLE=(--accelerator cpu --devices 2 --num 8 --steps 2 --batch-size 2)
else
    if ! "$PY" - > "$OUT/env.txt" 2>&1 <<'PYEOF'
import os, diffusers, lightning, timm, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__,
      "lightning", lightning.__version__, "timm", timm.__version__, "cpu cores", os.cpu_count())
assert torch.cuda.is_available(), "no CUDA device visible"
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i), f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB")
PYEOF
    then
        log "FAIL: environment check (see env.txt)"; cat "$OUT/env.txt"; exit 2
    fi
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    ACCEL=(--trainer.accelerator=gpu --trainer.devices=-1)
    BENCH=(--precisions bf16 --repeats "$REPEATS" --mfu 0.4)
    JOINT=(--joint-step --precisions bf16 --repeats "$REPEATS" --batch-size 16)
    COMPILE=(--compile --precisions bf16 --repeats "$REPEATS" --modes encode,decode
             --autoencoders TC-AE-B/p8-c128,DC-AE/f32c32 --dits DiT-B/1 --skip-jpeg)
    AE_NET=TC-AE-S/p4-c32; SIZE=64
    AE_TINY=(--model.init_args.max_steps=40 --model.init_args.loss.disc_start=10)
    CACHE_TINY=()
    DIT_TINY=(--trainer.max_steps=60)
    SAMPLE=(--num 64 --steps 25 --batch-size 16)
fi
log "$(head -1 "$OUT/env.txt" 2>/dev/null || echo "tiny dry run on the CPU"); $NGPU GPU(s); budget ${BUDGET}s"

# 1. paper-scale benchmark (the JPEG pipelines use this machine's cores) with per-op profiles
step bench 170 bench.txt -- "${TCAE[@]}" bench "${BENCH[@]}" --profile --out "$OUT/bench.json"
# 2. the joint step, pass by pass
step joint 70 joint.txt -- "${TCAE[@]}" bench "${JOINT[@]}" --out "$OUT/joint.json"

# 3. bf16-mixed DDP training steps of the demo autoencoder on every visible GPU, colour ops on the device
STRATEGY=()
[ "$NGPU" -gt 1 ] || [ "$TINY" = 1 ] && STRATEGY=(--trainer.strategy=ddp_find_unused_parameters_true)  # mask token
step fit 100 fit.txt -- "${TCAE[@]}" fit --config configs/demo/tcae.yaml "${ACCEL[@]}" --trainer.precision=bf16-mixed \
    ${STRATEGY[@]+"${STRATEGY[@]}"} "${AE_TINY[@]}" --model.init_args.metrics_fid=null \
    --data.init_args.views.color_on_device=true --trainer.logger.init_args.save_dir="$OUT/fit" \
    --trainer.callbacks.init_args.dirpath="$OUT/fit/tcae/checkpoints"
AE_CKPT="$OUT/fit/tcae/checkpoints/last.ckpt"
[ "${RC[fit]}" = 0 ] && [ ! -f "$AE_CKPT" ] && RC[fit]="no last.ckpt"

# 4. its latent cache (one device), then bf16-mixed DDP DiT training steps on every visible GPU
if [ "${RC[fit]}" = 0 ]; then
    step cache 60 cache.txt -- "${TCAE[@]}" predict --config configs/demo/cache_latents_tcae.yaml \
        --trainer.accelerator="$([ "$TINY" = 1 ] && echo cpu || echo gpu)" --trainer.devices=1 \
        --trainer.default_root_dir="$OUT/cache" --model.init_args.autoencoder.path="$AE_CKPT" \
        ${CACHE_TINY[@]+"${CACHE_TINY[@]}"} --trainer.callbacks.init_args.output_dir="$OUT/latents"
else
    RC[cache]="skipped (no autoencoder)"
fi
DIT_CKPT="$OUT/fit/dit_tcae/checkpoints/last.ckpt"
if [ "${RC[cache]}" = 0 ]; then
    DIT_STRATEGY=()
    [ "$NGPU" -gt 1 ] || [ "$TINY" = 1 ] && DIT_STRATEGY=(--trainer.strategy=ddp)  # every DiT parameter gets a gradient
    step dit 100 dit.txt -- "${TCAE[@]}" fit --config configs/demo/dit_on_tcae.yaml "${ACCEL[@]}" \
        --trainer.precision=bf16-mixed ${DIT_STRATEGY[@]+"${DIT_STRATEGY[@]}"} "${DIT_TINY[@]}" \
        --data.init_args.cache_dir="$OUT/latents" --data.init_args.expect_autoencoder.path="$AE_CKPT" \
        --data.init_args.expect_autoencoder.name="$AE_NET" --data.init_args.expect_image_size="$SIZE" \
        --model.init_args.sample_every_n_steps=0 --trainer.logger.init_args.save_dir="$OUT/fit" \
        --trainer.callbacks="[{\"class_path\": \"lightning.pytorch.callbacks.ModelCheckpoint\", \"init_args\": {\"dirpath\": \"$OUT/fit/dit_tcae/checkpoints\", \"save_last\": true, \"save_top_k\": 0}}]"
    [ "${RC[dit]}" = 0 ] && [ ! -f "$DIT_CKPT" ] && RC[dit]="no last.ckpt"
else
    RC[dit]="skipped (no cache)"
fi

# 5. sampling on every visible device, and the exports of both runs
if [ "${RC[dit]}" = 0 ]; then
    rm -rf "$OUT/export"
    step sample 60 sample.txt -- "${TCAE[@]}" sample --ckpt "$DIT_CKPT" --out "$OUT/samples" "${SAMPLE[@]}"
    step export 30 export.txt -- "${TCAE[@]}" export --ckpt "$AE_CKPT" --out "$OUT/export/tcae" --cache "$OUT/latents"
    [ "${RC[export]}" = 0 ] && step export 30 export_dit.txt -- "${TCAE[@]}" export --ckpt "$DIT_CKPT" --out "$OUT/export/dit"
else
    RC[sample]="skipped (no DiT)"; RC[export]="skipped (no DiT)"
fi

# 6. torch.compile speed-ups and the compiled ratio, with the time left
step compile 600 bench_compile.txt -- "${TCAE[@]}" bench "${COMPILE[@]}" --out "$OUT/bench_compile.json"

# The figures, from the JSON reports
"$PY" - "$OUT" > "$OUT/figures.txt" 2>&1 <<'PYEOF'
import json, os, sys
out = sys.argv[1]

def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.isfile(path) else None

for name in ("bench.json", "bench_compile.json"):
    r = load(name)
    if not r:
        print(f"{name}: missing"); continue
    env = r["env"]
    print(f"{name}: {env.get('device_name') or env['cpu']}, peak {env.get('peak_bf16_tflops')} TFLOP/s bf16, "
          f"reference {r['reference']}")
    for n, e in r["autoencoders"].items():
        for key in ("throughput", "compiled"):
            for prec, modes in e.get(key, {}).items():
                for mode, m in modes.items():
                    if "items_per_s" not in m:
                        print(f"  {n} {key} {prec} {mode}: {m.get('error', '-')}"); continue
                    spread = (f" [rounds {m['ratio_rounds_median']:.2f}x, {m['ratio_rounds_min']:.2f}-"
                              f"{m['ratio_rounds_max']:.2f}]" if "ratio_rounds_median" in m else "")
                    mfu = f", MFU {m['mfu']:.1%}" if m.get("mfu") else ""
                    mem = f", peak {m['peak_mem_mb']:.0f} MB" if m.get("peak_mem_mb") else ""
                    speed = f", x{m['speedup']:.2f} compiled/eager" if m.get("speedup") else ""
                    print(f"  {n} {key} {prec} {mode}: {m['items_per_s']:.4g} img/s, "
                          f"{(m.get('ratio_vs_reference') or 0):.2f}x ref{spread}{mfu}{mem}{speed}")
    for n, e in r["dits"].items():
        for key in ("throughput", "compiled"):
            for prec, modes in e.get(key, {}).items():
                m = modes.get("train", {})
                if "items_per_s" in m:
                    print(f"  {n} {key} {prec} train: {m['items_per_s']:.4g} latents/s, MFU {(m.get('mfu') or 0):.1%}, "
                          f"peak {(m.get('peak_mem_mb') or 0):.0f} MB")
    feed = (r.get("jpeg_pipelines") or {}).get("feed")
    if feed:
        print(f"  JPEG: one worker {feed['worker_images_per_s']:.1f} img/s; {feed['workers_needed']:.1f} workers per GPU "
              f"needed, {feed['workers_for_margin']:.1f} for the margin; num_workers={feed['num_workers']}: "
              f"{feed['margin']:.2f}x -> {feed['verdict']}")
    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    for name_, e in (r.get("jpeg_pipelines") or {}).get("pipelines", {}).items():
        print(f"  JPEG {name_} per worker: reference {fmt(e['reference'].get('items_per_s'))} img/s, fast "
              f"{fmt(e['fast'].get('items_per_s'))} img/s ({fmt(e.get('speedup'), '.2f')}x), device colour ops "
              f"{fmt(e.get('device_ms_per_image'), '.3f')} ms/img")
j = load("joint.json")
if j:
    for prec, t in j["joint_step"]["timing"].items():
        ratio = f"{t['ratio']:.2f}x" if t.get("ratio") else "-"
        print(f"joint step {prec}: joint / reconstruction-only time {ratio}, GMACs "
              f"{j['joint_step']['gmacs']['step']['ratio']:.2f}x")
PYEOF
cat "$OUT/figures.txt"

log "done: $(for k in bench joint fit cache dit sample export compile; do printf '%s=%s ' "$k" "${RC[$k]:-?}"; done)"
[ "${RC[bench]}" = 0 ] && [ "${RC[fit]}" = 0 ] && [ "${RC[dit]}" = 0 ]
