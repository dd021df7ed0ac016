#!/bin/bash
# Sampling under torchrun, on every machine with its own NODE_RANK (as torchrun_fit.sh), from the repository root.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 CKPT=runs/imagenet/dit_tcae/checkpoints/last.ckpt bash scripts/launch/torchrun_sample.sh
set -euo pipefail
CKPT=${CKPT:-runs/imagenet/dit_tcae/checkpoints/last.ckpt}
OUT=${OUT:-samples/dit_tcae}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS=${GPUS:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" \
  --master-port="$MASTER_PORT" -m tcae_ldm.cli sample --ckpt="$CKPT" --out="$OUT" --num=50000 \
  --num-nodes="$NNODES" --devices="$GPUS"
