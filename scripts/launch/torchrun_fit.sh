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
source "$(dirname "$0")/../torchrun_common.sh"  # NNODES, NODE_RANK, GPUS, MASTER_ADDR / _PORT
DATA_ARGS=()
case "$CONFIG" in *dit_on_*) ;; *) DATA_ARGS=(--data.init_args.root="$DATA") ;; esac
"${TORCHRUN[@]}" -m tcae_ldm.cli fit --config="$CONFIG" "${DATA_ARGS[@]}" \
  --trainer.num_nodes="$NNODES" --trainer.devices="$GPUS" --ckpt_path=last
