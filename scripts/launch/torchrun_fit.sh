#!/bin/bash
# The multi-node training run under torchrun: start it on every machine with the same MASTER_ADDR and its own
# NODE_RANK, from the repository root (CONFIG / DATA as in slurm_fit.sbatch):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash scripts/launch/torchrun_fit.sh      # on host0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 bash scripts/launch/torchrun_fit.sh      # on host1
# Preemption: SIGTERM to torchrun reaches every worker; training stops at the next step boundary with last.ckpt
# saved and a non-zero exit status. Running the same command again continues from that step (--ckpt_path last).
set -euo pipefail
CONFIG=${CONFIG:-configs/tcae.yaml}
DATA=${DATA:-/data/imagenet}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS=${GPUS:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
DATA_ARGS=()
case "$CONFIG" in *dit_on_*) ;; *) DATA_ARGS=(--data.init_args.root="$DATA") ;; esac
torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" \
  --master-port="$MASTER_PORT" -m tcae_ldm.cli fit --config="$CONFIG" "${DATA_ARGS[@]}" \
  --trainer.num_nodes="$NNODES" --trainer.devices="$GPUS" --ckpt_path=last
