#!/usr/bin/env bash
# Launch `polymodal pretrain` with torchrun.
#
# usage: launch/torchrun.sh CONFIG.yaml [key=value ...]
#
#   one node (default):   launch/torchrun.sh configs/engine-cifar10.yaml steps=1000
#   N nodes:              run the same line on every node, with the same settings:
#                         NNODES=2 MASTER_ADDR=node1 MASTER_PORT=29500 RUN_ID=exp1 \
#                             launch/torchrun.sh configs/engine-cifar10.yaml
#   CPU test (2 procs):   DS_ACCELERATOR=cpu NPROC=2 launch/torchrun.sh CONFIG.yaml
#
# Settings (environment variables):
#   NPROC         processes per node: a number, or auto (one per GPU; one per CPU core on
#                 a machine without GPUs, so set NPROC there). Default: auto.
#   NNODES        number of nodes (or MIN:MAX for an elastic range). Default: 1.
#                 1 -> `torchrun --standalone` (private rendezvous on a free local port).
#                 >1 -> c10d rendezvous at MASTER_ADDR:MASTER_PORT; every node runs this
#                 script, no node rank needed (torchrun assigns them).
#   MASTER_ADDR   multi-node: host that serves the rendezvous (any one of the nodes,
#                 usually the first). Required when NNODES>1.
#   MASTER_PORT   multi-node: rendezvous port on MASTER_ADDR. Default: 29500. Note the workers
#                 then get a *different* MASTER_PORT (torchrun picks a free one for the
#                 process group store); do not rely on the two being equal.
#   RUN_ID        multi-node: rendezvous id, the same on every node, unique per job.
#                 Default: $SLURM_JOB_ID when set; otherwise required when NNODES>1.
#   MAX_RESTARTS  how often torchrun restarts the whole worker group after a worker fails
#                 or a node leaves/joins. Default: 3 with NNODES>1, 0 on one node.
#   RESUME        value passed as resume=... unless the command line already has a resume=.
#                 Default: latest, so a restarted worker group continues from the last
#                 complete checkpoint (and a first run with no checkpoint starts fresh).
#                 RESUME= (empty) passes nothing.
#   POLYMODAL     command that is started per process. Default: polymodal (the console script;
#                 it must be on PATH, e.g. the activated venv). Example for a probe:
#                 POLYMODAL="python /tmp/probe.py".
#   TORCHRUN      torchrun executable. Default: torchrun.
#   TORCHRUN_ARGS extra torchrun flags, word-split (e.g. "--log-dir logs --redirects 3").
#
# The workers get RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR,
# MASTER_PORT and TORCHELASTIC_* (RESTART_COUNT, RUN_ID, MAX_RESTARTS); polymodal reads the
# first five. torchrun also sets OMP_NUM_THREADS=1 unless it is already set.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    if [[ $# -ge 1 ]]; then usage; exit 0; fi
    usage >&2
    exit 2
fi
CONFIG=$1
shift
if [[ ! -f $CONFIG ]]; then
    echo "torchrun.sh: config file not found: $CONFIG" >&2
    exit 2
fi

NPROC=${NPROC:-auto}
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
RESUME=${RESUME-latest}
read -r -a POLYMODAL_CMD <<< "${POLYMODAL:-polymodal}"
read -r -a EXTRA <<< "${TORCHRUN_ARGS:-}"

# resume=latest unless the user chose a resume= themselves.
OVERRIDES=("$@")
have_resume=0
for arg in "$@"; do
    [[ $arg == resume=* ]] && have_resume=1
done
if [[ $have_resume == 0 && -n $RESUME ]]; then
    OVERRIDES+=("resume=$RESUME")
fi

LAUNCH=("${TORCHRUN:-torchrun}" --nproc_per_node "$NPROC")
if [[ $NNODES == 1 ]]; then
    # One node: --standalone runs its own c10d rendezvous on a free localhost port.
    LAUNCH+=(--standalone --max-restarts "${MAX_RESTARTS:-0}")
else
    if [[ -z ${MASTER_ADDR:-} ]]; then
        echo "torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (the rendezvous host)" >&2
        exit 2
    fi
    RUN_ID=${RUN_ID:-${SLURM_JOB_ID:-}}
    if [[ -z $RUN_ID ]]; then
        echo "torchrun.sh: NNODES=$NNODES needs RUN_ID (same on every node; SLURM_JOB_ID is used when set)" >&2
        exit 2
    fi
    LAUNCH+=(
        --nnodes "$NNODES"
        --rdzv_backend c10d                        # elastic rendezvous served by a torchrun agent
        --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
        --rdzv_id "$RUN_ID"                        # nodes with the same id form one job
        --max-restarts "${MAX_RESTARTS:-3}"        # restart the worker group on failure
    )
fi
# --no-python: run POLYMODAL as given instead of `python POLYMODAL`.
LAUNCH+=("${EXTRA[@]}" --no-python "${POLYMODAL_CMD[@]}" pretrain "$CONFIG" "${OVERRIDES[@]}")

echo "+ ${LAUNCH[*]}" >&2
exec "${LAUNCH[@]}"
