#!/usr/bin/env bash
# Prune + distill with DeepSpeed on the nodes of a DeepSpeed hostfile, without SLURM.
# Run this same command on every node (by hand, pdsh or your scheduler), from the repository root:
#   launch/deepspeed_multinode.sh [recipe overrides...]
# The node's rank is its line in the hostfile (matched by `hostname -s`, or MACHINE_RANK=<n>); the
# first host is the main process. Each node starts its own `accelerate launch` with the standard
# (torchrun) multi-node launcher, so no passwordless ssh or pdsh is needed.
# Environment knobs: HOSTFILE (launch/hostfile), RECIPE_CONFIG, ACCELERATE_CONFIG
# (launch/multinode_zero3.yaml), MAIN_PROCESS_PORT (29500), MACHINE_RANK, ACCELERATE.
set -euo pipefail

HOSTFILE="${HOSTFILE:-launch/hostfile}"
RECIPE_CONFIG="${RECIPE_CONFIG:-recipes/configs/llama8b_to_4b_minitron.yaml}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-launch/multinode_zero3.yaml}"
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-29500}"
ACCELERATE="${ACCELERATE:-accelerate}"

[ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE not found (set HOSTFILE=...)" >&2; exit 2; }
mapfile -t HOSTS < <(grep -vE '^[[:space:]]*(#|$)' "$HOSTFILE" | awk '{print $1}')
mapfile -t SLOTS < <(grep -vE '^[[:space:]]*(#|$)' "$HOSTFILE" | sed -nE 's/.*slots=([0-9]+).*/\1/p')
[ "${#HOSTS[@]}" -gt 0 ] || { echo "hostfile $HOSTFILE lists no hosts" >&2; exit 2; }
[ "${#SLOTS[@]}" -eq "${#HOSTS[@]}" ] || { echo "every line of $HOSTFILE needs slots=<n>" >&2; exit 2; }
for s in "${SLOTS[@]}"; do
  [ "$s" = "${SLOTS[0]}" ] || { echo "all nodes need the same slots= (got ${SLOTS[*]})" >&2; exit 2; }
done

NUM_MACHINES="${#HOSTS[@]}"
NUM_PROCESSES=$((NUM_MACHINES * SLOTS[0]))
MAIN_PROCESS_IP="${HOSTS[0]}"
if [ -z "${MACHINE_RANK:-}" ]; then
  me="$(hostname -s)"
  for i in "${!HOSTS[@]}"; do
    if [ "${HOSTS[$i]}" = "$me" ] || [ "${HOSTS[$i]}" = "$(hostname)" ]; then MACHINE_RANK=$i; fi
  done
  [ -n "${MACHINE_RANK:-}" ] || { echo "$me is not in $HOSTFILE; set MACHINE_RANK=<line index>" >&2; exit 2; }
fi

echo "node $MACHINE_RANK of $NUM_MACHINES, $NUM_PROCESSES processes, main $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT"
exec $ACCELERATE launch --config_file "$ACCELERATE_CONFIG" \
  --deepspeed_hostfile "$HOSTFILE" --deepspeed_multinode_launcher standard \
  --num_machines "$NUM_MACHINES" --num_processes "$NUM_PROCESSES" --machine_rank "$MACHINE_RANK" \
  --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
  --rdzv_backend static --same_network \
  recipes/prune_distill.py --config "$RECIPE_CONFIG" "$@"
