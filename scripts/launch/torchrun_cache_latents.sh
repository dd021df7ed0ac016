#!/bin/bash
# The latent cache under torchrun, on every machine with its own NODE_RANK (as torchrun_fit.sh), from the
# repository root. A cache has no checkpoint: an interrupted one is written again by the same command.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash scripts/launch/torchrun_cache_latents.sh
set -euo pipefail
CONFIG=${CONFIG:-configs/cache_latents_tcae.yaml}
DATA=${DATA:-/data/imagenet}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS=${GPUS:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" \
  --master-port="$MASTER_PORT" -m tcae_ldm.cli predict --config="$CONFIG" --data.init_args.images.init_args.root="$DATA" \
  --trainer.num_nodes="$NNODES" --trainer.devices="$GPUS"
