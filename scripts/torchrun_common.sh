# Sourced by scripts/launch/torchrun_*.sh: this machine's place in the job, from the environment (defaults: one
# node of 8 GPUs), and the torchrun command that starts its processes.
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS=${GPUS:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TORCHRUN=(torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR"
          --master-port="$MASTER_PORT")
