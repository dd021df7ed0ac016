#!/bin/bash
# Sampling under torchrun, on every machine with its own NODE_RANK (as torchrun_fit.sh), from the repository root.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 CKPT=runs/imagenet/dit_tcae/checkpoints/last.ckpt bash scripts/launch/torchrun_sample.sh
set -euo pipefail
CKPT=${CKPT:-runs/imagenet/dit_tcae/checkpoints/last.ckpt}
OUT=${OUT:-samples/dit_tcae}
source "$(dirname "$0")/../torchrun_common.sh"  # NNODES, NODE_RANK, GPUS, MASTER_ADDR / _PORT
"${TORCHRUN[@]}" -m tcae_ldm.cli sample --ckpt="$CKPT" --out="$OUT" --num=50000 \
  --num-nodes="$NNODES" --devices="$GPUS"
