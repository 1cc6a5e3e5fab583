#!/usr/bin/env bash
# Launch a training script (or `-m module`) with torchrun: one node, or many.
#
# One node: every local GPU, or 2 CPU ranks (gloo) when there is no GPU:
#     launch/torchrun.sh train.py --lr 3e-4
#     launch/torchrun.sh --nproc 4 -m shardopt demo
#
# Several nodes: run the same line on every node; c10d rendezvous at HOST:PORT
# (any node that all of them can reach, usually node 0) assigns the node ranks:
#     launch/torchrun.sh --nnodes 2 --rdzv-endpoint node0:29500 --rdzv-id run42 train.py
#
# Every option can also come from the environment: NPROC, NNODES,
# RDZV_ENDPOINT (or MASTER_ADDR + MASTER_PORT), RDZV_ID, PYTHON.
# --dry-run prints the torchrun command instead of running it.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "torchrun.sh: error: $*" >&2; exit 2; }

PYTHON=${PYTHON:-python}
NPROC=${NPROC:-}
NNODES=${NNODES:-1}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
if [[ -z "$RDZV_ENDPOINT" && -n "${MASTER_ADDR:-}" ]]; then
    RDZV_ENDPOINT="${MASTER_ADDR}:${MASTER_PORT:-29500}"
fi
RDZV_ID=${RDZV_ID:-shardopt}
DRY_RUN=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nproc|--nproc-per-node|--nproc_per_node) [[ $# -ge 2 ]] || die "$1 needs a value"; NPROC=$2; shift 2 ;;
        --nnodes) [[ $# -ge 2 ]] || die "$1 needs a value"; NNODES=$2; shift 2 ;;
        --rdzv-endpoint|--rdzv_endpoint) [[ $# -ge 2 ]] || die "$1 needs a value"; RDZV_ENDPOINT=$2; shift 2 ;;
        --rdzv-id|--rdzv_id) [[ $# -ge 2 ]] || die "$1 needs a value"; RDZV_ID=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -m) break ;;
        -*) die "unknown option $1 (the script and its arguments come after the launcher's options)" ;;
        *) break ;;
    esac
done
[[ $# -gt 0 ]] || die "no training script given (usage: launch/torchrun.sh [options] SCRIPT.py [ARGS...] | -m MODULE [ARGS...])"
[[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "--nnodes must be a positive integer (or MIN:MAX), got '$NNODES'"

if [[ -z "$NPROC" ]]; then
    # one rank per GPU; without GPUs, 2 CPU ranks (the script picks gloo)
    NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)' 2>/dev/null) || NPROC=2
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$NPROC'"

cmd=("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC")
if [[ "$NNODES" == 1 && -z "$RDZV_ENDPOINT" ]]; then
    # one node: a private rendezvous on a free local port, so parallel jobs don't collide
    cmd+=(--standalone)
else
    [[ -n "$RDZV_ENDPOINT" ]] || die "--nnodes $NNODES needs --rdzv-endpoint HOST:PORT (or MASTER_ADDR/MASTER_PORT)"
    [[ "$RDZV_ENDPOINT" == *:* ]] || die "--rdzv-endpoint must be HOST:PORT, got '$RDZV_ENDPOINT'"
    cmd+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
fi
cmd+=("$@")

echo "+ ${cmd[*]}" >&2
if [[ "$DRY_RUN" == 1 ]]; then
    exit 0
fi
exec "${cmd[@]}"
