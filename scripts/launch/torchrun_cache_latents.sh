#!/bin/bash
# The latent cache under torchrun, on every machine with its own NODE_RANK (as torchrun_fit.sh), from the
# repository root. A cache has no checkpoint: an interrupted one is written again by the same command.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash scripts/launch/torchrun_cache_latents.sh
set -euo pipefail
CONFIG=${CONFIG:-configs/cache_latents_tcae.yaml}
DATA=${DATA:-/data/imagenet}
source "$(dirname "$0")/../torchrun_common.sh"  # NNODES, NODE_RANK, GPUS, MASTER_ADDR / _PORT
"${TORCHRUN[@]}" -m tcae_ldm.cli predict --config="$CONFIG" --data.init_args.images.init_args.root="$DATA" \
  --trainer.num_nodes="$NNODES" --trainer.devices="$GPUS"
