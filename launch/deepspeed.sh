#!/usr/bin/env bash
# Launch `polymodal pretrain` with the DeepSpeed launcher (`deepspeed`).
#
# usage: launch/deepspeed.sh CONFIG.yaml [key=value ...]
#
#   one node, all GPUs:   launch/deepspeed.sh configs/engine-cifar10.yaml steps=1000
#   one node, 4 GPUs:     NUM_GPUS=4 launch/deepspeed.sh CONFIG.yaml
#   N nodes over ssh:     HOSTFILE=launch/hostfile launch/deepspeed.sh CONFIG.yaml
#                         (run once, on the first host; pdsh starts the others over
#                         passwordless ssh, see launch/hostfile.example)
#   N nodes without ssh:  on every node, with its own NODE_RANK (0..N-1):
#                         HOSTFILE=launch/hostfile NO_SSH=1 NODE_RANK=0 MASTER_ADDR=node1 \
#                             launch/deepspeed.sh CONFIG.yaml
#   CPU test (2 procs):   DS_ACCELERATOR=cpu NUM_GPUS=2 launch/deepspeed.sh CONFIG.yaml
#
# Settings (environment variables):
#   NUM_GPUS      processes per node (--num_gpus, alias --num_accelerators). Default: every GPU
#                 the launcher sees. Set it on CPU: the CPU accelerator reports one "device"
#                 per NUMA node, so without it you get 1 process.
#   HOSTFILE      DeepSpeed hostfile (`host slots=N` lines). Unset: single node, no hostfile
#                 (the launcher would otherwise read /job/hostfile if it exists).
#   MASTER_ADDR   with HOSTFILE: address of the first host (rank 0). Default: the first host
#                 name in HOSTFILE (without it the launcher runs `ssh HOST hostname -I`).
#   MASTER_PORT   process-group port on MASTER_ADDR. Default: 29500.
#   NO_SSH=1      multi-node without ssh/pdsh: start this script on every node yourself,
#   NODE_RANK     with NODE_RANK=0..N-1 (the order of hosts in HOSTFILE).
#   DS_LAUNCHER   multi-node backend: pdsh (default), openmpi, mvapich, mpich, impi, slurm.
#   RESUME        if set (e.g. latest), passed as resume=... unless the command line has one.
#   POLYMODAL     command to start per process instead of the default `python -m polymodal`
#                 (e.g. POLYMODAL="python /tmp/probe.py"); run with --no_python.
#   DEEPSPEED     deepspeed executable. Default: deepspeed.
#   DS_ARGS       extra launcher flags, word-split (e.g. "--enable_each_rank_log logs").
#
# Always passed:
#   --no_local_rank  without it every process gets `--local_rank=N` inserted *before* the
#                    user arguments (`python -m polymodal --local_rank=0 pretrain ...`), which
#                    the polymodal CLI rejects. LOCAL_RANK is in the environment anyway.
#   --module polymodal  runs `python -m polymodal` with the launcher's own interpreter, so the
#                    remote nodes need no PATH set up (pdsh forwards only PYTHON*, NCCL*, UCX*,
#                    MLFLOW*, MV2* variables and the lines of ./.deepspeed_env or
#                    ~/.deepspeed_env; put e.g. DS_ACCELERATOR=cpu or OMP_NUM_THREADS there).
#
# The processes get RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, LOCAL_SIZE (not
# LOCAL_WORLD_SIZE), CROSS_RANK (node rank), CROSS_SIZE (nodes) and CUDA_VISIBLE_DEVICES.
# There are no restarts: after a failure run it again with RESUME=latest.
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
    echo "deepspeed.sh: config file not found: $CONFIG" >&2
    exit 2
fi

RESUME=${RESUME:-}
read -r -a EXTRA <<< "${DS_ARGS:-}"

OVERRIDES=("$@")
have_resume=0
for arg in "$@"; do
    [[ $arg == resume=* ]] && have_resume=1
done
if [[ $have_resume == 0 && -n $RESUME ]]; then
    OVERRIDES+=("resume=$RESUME")
fi

LAUNCH=("${DEEPSPEED:-deepspeed}" --master_port "${MASTER_PORT:-29500}" --no_local_rank)
[[ -n ${NUM_GPUS:-} ]] && LAUNCH+=(--num_gpus "$NUM_GPUS")

if [[ -n ${HOSTFILE:-} ]]; then
    if [[ ! -f $HOSTFILE ]]; then
        echo "deepspeed.sh: hostfile not found: $HOSTFILE" >&2
        exit 2
    fi
    # Host names in file order, without comments and blank lines.
    mapfile -t HOSTS < <(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF {print $1}')
    if [[ ${#HOSTS[@]} -eq 0 ]]; then
        echo "deepspeed.sh: no hosts in $HOSTFILE" >&2
        exit 2
    fi
    LAUNCH+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-${HOSTS[0]}}")
    if [[ ${NO_SSH:-0} == 1 ]]; then
        if [[ -z ${NODE_RANK:-} ]]; then
            echo "deepspeed.sh: NO_SSH=1 needs NODE_RANK (0..$((${#HOSTS[@]} - 1)))" >&2
            exit 2
        fi
        LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
    elif [[ ${#HOSTS[@]} -eq 1 ]]; then
        # One host: runs locally, so skip the launcher's `ssh HOST hostname` check.
        LAUNCH+=(--no_ssh_check)
    else
        LAUNCH+=(--launcher "${DS_LAUNCHER:-pdsh}")
    fi
else
    # No hostfile: one node, processes on this machine only. Point --hostfile at a path that
    # does not exist so a stray /job/hostfile is not picked up.
    LAUNCH+=(--hostfile /dev/null/no-hostfile)
fi

LAUNCH+=("${EXTRA[@]}")
if [[ -n ${POLYMODAL:-} ]]; then
    read -r -a POLYMODAL_CMD <<< "$POLYMODAL"
    LAUNCH+=(--no_python "${POLYMODAL_CMD[@]}")
else
    LAUNCH+=(--module polymodal)
fi
LAUNCH+=(pretrain "$CONFIG" "${OVERRIDES[@]}")

echo "+ ${LAUNCH[*]}" >&2
exec "${LAUNCH[@]}"
