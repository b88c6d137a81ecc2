#!/usr/bin/env bash
# The GPU check: on a bare machine with one CUDA GPU (an H100 or H200) whose Python has torch, timm, transformers and
# accelerate but none of our other dependencies, and no package index, install the rest from wheels/ (made by
# benchmarks/gpu_wheels.sh and carried along with the repository), then run every test marked `gpu` and the GPU
# paths of the step, evaluation, attention, tokenizer and 4M benchmarks, each under its own time limit and all within --budget seconds (default 460: the
# whole script ends within 8 minutes). OUT_DIR gets three files (the device machine returns at most 8):
# gpu_check_summary.json (each part's command, exit code, seconds and headline figures), gpu_check.log (every
# part's output) and gpu_check_parts.tar.gz (each benchmark's whole JSON).
#
#   bash benchmarks/gpu_check.sh [OPTIONS] [OUT_DIR]     # OUT_DIR: default $OUT where set, else gpu-check-out
#   bash benchmarks/gpu_check.sh --dry-run               # resolve the wheel list, print the commands; run nothing
#
# Options:
#   --dry-run          check the wheel folder and print what would be installed and run; install and run nothing
#   --wheels DIR       the wheel folder (default: wheels)
#   --data-root DIR    the folder holding cifar10/{test,train}.tar.gz (default: ../shared/data beside the
#                      repository where it holds them, else wheels/data, where gpu_wheels.sh puts a copy)
#   --budget SECONDS   all the parts together, setup included (default: 460); a part gets at most what is left
#   --only "P ..."     run only these parts (setup always runs): pytest_gpu engine_overhead spark_step eval_speed
#                      attention clip_step tokenize_speed multimae_step fourm_step fourm_generate
#   --python PY        the interpreter with torch (default: $PYTHON, else python3)
#
# It stops at once, with one line and a non-zero exit, before installing anything, when that Python cannot import
# torch (exit 2), sees no CUDA GPU (exit 2), or the wheel folder or the CIFAR-10 archives are missing or incomplete
# (exit 3: the line names what is missing). Otherwise it exits 0 when every part passed, 1 when any failed.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
WHEELS=wheels
DATA_ROOT=
BUDGET=460
DRY=0
ONLY="pytest_gpu engine_overhead spark_step eval_speed attention clip_step tokenize_speed multimae_step fourm_step fourm_generate"
OUT_DIR=${OUT:-gpu-check-out}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --wheels) WHEELS=${2%/}; shift 2 ;;
    --data-root) DATA_ROOT=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT_DIR=$1; shift ;;
  esac
done
fail() { echo "FAIL: $2" >&2; exit "$1"; }
case "$OUT_DIR" in /*) ;; *) OUT_DIR=$REPO/$OUT_DIR ;; esac
T0=$SECONDS

# --- 1. Fast checks, before anything is installed ----------------------------------------------------------------
command -v "$PY" >/dev/null 2>&1 || fail 2 "no Python '$PY' (pass --python or set PYTHON)"
probe=$("$PY" -c 'import sys, torch
try:
    print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception:  # a driver that answers is_available but not the name: no usable GPU either
    print("")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}")' 2>/dev/null) ||
  { [ "$DRY" = 1 ] || fail 2 "$PY cannot import torch: run this where torch is installed (pass --python or set PYTHON)"
    probe=$'\n'"$PY cannot import torch"; }
gpu=$(sed -n 1p <<< "$probe"); torch_version=$(sed -n 2p <<< "$probe")
if [ -z "$gpu" ]; then
  [ "$DRY" = 1 ] || fail 2 "no CUDA GPU: torch.cuda.is_available() is false ($torch_version, $PY); this check needs one H100/H200"
  echo "no CUDA GPU here ($torch_version): a real run would stop at this point"
else
  echo "GPU: $gpu; $torch_version"
fi
wheel_list=$("$PY" benchmarks/gpu_kit.py resolve --wheels "$WHEELS" --format tsv) || exit 3  # gpu_kit said what
if [ -z "$DATA_ROOT" ]; then
  DATA_ROOT="$REPO/../shared/data"
  [ -f "$DATA_ROOT/cifar10/test.tar.gz" ] || DATA_ROOT="$WHEELS/data"
fi
data_abs=$(cd "$DATA_ROOT" 2>/dev/null && pwd) ||
  fail 3 "data folder $DATA_ROOT not found: run benchmarks/gpu_wheels.sh (it copies cifar10/ into $WHEELS/data)"
DATA_ROOT=$data_abs
for f in test.tar.gz train.tar.gz; do
  [ -f "$DATA_ROOT/cifar10/$f" ] || fail 3 "$DATA_ROOT/cifar10/$f missing: run benchmarks/gpu_wheels.sh (it copies cifar10/ into $WHEELS/data)"
done

# --- 2. The plan ---------------------------------------------------------------------------------------------------
WORK=${TMPDIR:-/tmp}/polymodal-gpu-check   # shards, run folders, logs (not under OUT_DIR: at most 8 files come back)
# Setup: the wheels (pinned, --no-deps: nothing already there moves, torch above all; typing-extensions only where
# older than its floor), webdataset 0.2.86 in a folder of its own, polymodal itself (the repository on sys.path
# through a .pth file: like PYTHONPATH, but it holds in subprocesses too, which clip_step.py starts without
# PYTHONPATH; an editable install needs a recent setuptools and writes into the repository), ../shared/data for the
# tests (they read their data there) when it is missing, then one import of each.
PEER_WDS=$WORK/wds0286                     # webdataset 0.2.86 for open_clip_train only (clip_step.py)
SITE_REQS=(); PEER_REQS=()
while IFS=$'\t' read -r kind req _file; do
  if [ "$kind" = peer ]; then PEER_REQS+=("$req"); else SITE_REQS+=("$req"); fi
done <<< "$wheel_list"
# The commands below are strings for `bash -c` (and for printing): every path and requirement in them is quoted.
q() { printf '%q' "$1"; }
case "$WHEELS" in /*) kit=$WHEELS ;; *) kit=$REPO/$WHEELS ;; esac
FOURM_KIT=$(q "$kit/data/4m-step-kit.tar.gz")   # gpu_wheels.sh packs it from data-out/4m-cifar
QPY=$(q "$PY"); QDATA=$(q "$DATA_ROOT"); QREPO=$(q "$REPO"); PEER_WDS=$(q "$PEER_WDS"); WORKQ=$(q "$WORK")
PIP="$QPY -m pip install -q --no-index --find-links $(q "$WHEELS") --no-deps --no-cache-dir --disable-pip-version-check"
SETUP=(
  "$PIP $(printf '%q ' "${SITE_REQS[@]}")"
  "rm -rf $PEER_WDS && $PIP --target $PEER_WDS $(printf '%q ' "${PEER_REQS[@]}")"
  "$QPY -c 'import site, sys; open(site.getsitepackages()[0] + \"/polymodal-repo.pth\", \"w\").write(sys.argv[1])' $QREPO"
  "[ -e $QREPO/../shared/data ] || { mkdir -p $QREPO/../shared && ln -s $QDATA $QREPO/../shared/data; }"
  "$QPY -c 'import deepspeed, open_clip, open_clip_train.main, webdataset, omegaconf, simplejpeg, pydantic, polymodal.cli, clip_benchmark.datasets.builder, clip_benchmark.metrics.zeroshot_classification; print(\"imports ok: deepspeed\", deepspeed.__version__, \"open_clip\", open_clip.__version__, \"webdataset\", webdataset.__version__)'"
)
# name, time limit (s), JSON file it writes under OUT_DIR, command. Sizes: small enough that all parts fit in the
# budget on one H100/H200, large enough that the GPU does real work (224 px, batch 64-256, bf16).
PARTS=(
  "pytest_gpu|180||$QPY -m pytest -m gpu -q -p no:cacheprovider tests"
  "engine_overhead|120|engine_overhead.json|$QPY benchmarks/engine_overhead.py --model resnet50 --image-size 224 --batch-size 128 --batches 16 --steps 10 --repeats 4 --warmup 3 --data-root $QDATA --shards $WORKQ/cifar10-test-shards --out OUTDIR/engine_overhead.json"
  "spark_step|120|spark_step.json|$QPY benchmarks/spark_step.py --device cuda --model resnet50 --image-size 224 --batch-size 64 --steps 20 --warmup 3 --rounds 2 --max-wait 0 --data-root $QDATA --shards-dir $WORKQ/cifar10-train2048 --out OUTDIR/spark_step.json"
  "eval_speed|180|eval_speed.json|$QPY benchmarks/eval_speed.py --device cuda --precision bf16 --model open_clip:ViT-B-32 --test-limit 5000 --train-limit 5000 --rounds 1 --workers 8 --max-wait 0 --data-root $QDATA --shards-dir $WORKQ/cifar10-eval --work-dir $WORKQ/eval-speed --out OUTDIR/eval_speed.json"
  "attention|100|attention.json|$QPY benchmarks/attention.py --device cuda --dtype bf16 --max-wait 0 --timeout 60 --out OUTDIR/attention.json"
  "clip_step|200|clip_step.json|$QPY benchmarks/clip_step.py --data emoji --workers 4 --steps 8 --warmup 4 --rounds 1 --retries 0 --max-wait 0 --peer-webdataset $PEER_WDS --work-dir $WORKQ/clip-step --out OUTDIR/clip_step.json"
  "tokenize_speed|60|tokenize_speed.json|$QPY benchmarks/tokenize_speed.py --device cuda --encode-only --out OUTDIR/tokenize_speed.json"
  "multimae_step|120|multimae_step.json|$QPY benchmarks/multimae_step.py --device cuda --precision bf16 --image-size 224 --patch-size 16 --dim 768 --depth 12 --heads 12 --decoder-dim 256 --decoder-depth 2 --decoder-heads 8 --num-visible 98 --batch-size 64 --steps 20 --warmup 3 --rounds 2 --max-wait 0 --data-root $QDATA --shards-dir $WORKQ/cifar10-train2048 --out OUTDIR/multimae_step.json"
  "fourm_step|90|fourm_step.json|[ -f $FOURM_KIT ] || { echo 'no 4M token kit at '$FOURM_KIT': run benchmarks/gpu_wheels.sh where recipes/4m.sh cifar data-out/4m-cifar has run'; exit 3; }; rm -rf $WORKQ/4m-kit && mkdir -p $WORKQ/4m-kit && tar xzf $FOURM_KIT -C $WORKQ/4m-kit && $QPY benchmarks/fourm_step.py --device cuda --precision bf16 --dim 768 --encoder-depth 12 --decoder-depth 12 --heads 12 --batch-size 256 --steps 20 --warmup 3 --rounds 2 --workers 4 --threads 8 --max-wait 0 --shards $WORKQ/4m-kit/train --join $WORKQ/4m-kit/tokens/train/image/tok_rgb $WORKQ/4m-kit/tokens/train/image/tok_caption $WORKQ/4m-kit/tokens/train/edges/tok_edges $WORKQ/4m-kit/tokens/train/palette/tok_palette $WORKQ/4m-kit/tokens/train/metadata/tok_metadata --out OUTDIR/fourm_step.json"
  "fourm_generate|90|fourm_generate.json|$QPY benchmarks/fourm_generate.py --device cuda --precision bf16 --dim 768 --encoder-depth 12 --decoder-depth 12 --heads 12 --batch-size 16 --rounds 2 --max-wait 0 --out OUTDIR/fourm_generate.json"
)
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
unset DS_ACCELERATOR

if [ "$DRY" = 1 ]; then
  "$PY" benchmarks/gpu_kit.py resolve --wheels "$WHEELS"
  echo "data: $DATA_ROOT/cifar10 (test.tar.gz, train.tar.gz)"
  echo "setup (time limit 120 s in all):"
  for c in "${SETUP[@]}"; do echo "  $c"; done
  echo "parts (time limit each; all within --budget $BUDGET s), output to $OUT_DIR:"
  for p in "${PARTS[@]}"; do
    IFS='|' read -r name limit json cmd <<< "$p"
    case " $ONLY " in *" $name "*) echo "  [$name, ${limit} s] ${cmd//OUTDIR/$(q "$OUT_DIR")}" ;; *) echo "  [$name: not in --only]" ;; esac
  done
  echo "then: $PY benchmarks/gpu_kit.py summary $OUT_DIR <parts> -> $OUT_DIR/gpu_check_summary.json"
  exit 0
fi

# --- 3. Run --------------------------------------------------------------------------------------------------------
mkdir -p "$OUT_DIR" "$WORK"
LOG=$OUT_DIR/gpu_check.log
RECORDS=$WORK/parts.tsv
: > "$LOG"; : > "$RECORDS"

run_part() {  # name, limit, json, command: runs it under `timeout` (at most what the budget has left), records it
  local name=$1 limit=$2 json=$3 cmd=$4 left start code
  left=$(( BUDGET - (SECONDS - T0) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    echo "=== $name: skipped, the budget of $BUDGET s is spent" | tee -a "$LOG"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" -1 0 0 "$json" "$cmd" >> "$RECORDS"
    return
  fi
  echo "=== $name (time limit $limit s): $cmd" | tee -a "$LOG"
  start=$SECONDS
  timeout --kill-after=10 "$limit" bash -c "$cmd" > "$WORK/$name.log" 2>&1 &
  local pid=$!
  tail -n +1 -f --pid=$pid "$WORK/$name.log" 2>/dev/null  # show it while it runs
  wait "$pid"; code=$?
  cat "$WORK/$name.log" >> "$LOG"
  echo "=== $name: exit $code after $(( SECONDS - start )) s" | tee -a "$LOG"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$code" "$(( SECONDS - start ))" "$limit" "$json" "$cmd" >> "$RECORDS"
}

run_part setup 120 "" "set -e; $(printf '%s; ' "${SETUP[@]}")"
if [ "$(cut -f2 "$RECORDS" | tail -1)" != 0 ]; then
  echo "FAIL: setup failed (see $LOG); nothing else was run" >&2
else
  for p in "${PARTS[@]}"; do
    IFS='|' read -r name limit json cmd <<< "$p"
    case " $ONLY " in *" $name "*) run_part "$name" "$limit" "$json" "${cmd//OUTDIR/$(q "$OUT_DIR")}" ;; esac
  done
fi

"$PY" - "$WORK/extra.json" "$wheel_list" "$gpu" "$(( SECONDS - T0 ))" <<'EOF'
import json, platform, sys, torch
path, wheel_list, gpu, wall = sys.argv[1:5]
rows = [line.split("\t") for line in wheel_list.splitlines() if line]
json.dump({"wall_seconds": int(wall), "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(),
           "wheels": [{"kind": k, "requirement": r, "file": f} for k, r, f in rows]}, open(path, "w"))
EOF
echo "=== summary ($(( SECONDS - T0 )) s in all)"
"$PY" benchmarks/gpu_kit.py summary "$OUT_DIR" "$RECORDS" --pytest-log "$WORK/pytest_gpu.log" --extra "$WORK/extra.json"
# One archive for the parts' JSONs: the device machine hands back at most 8 files.
parts_json=$(cd "$OUT_DIR" && ls -1 -- *.json 2>/dev/null | grep -vx gpu_check_summary.json)
if [ -n "$parts_json" ]; then
  (cd "$OUT_DIR" && tar czf gpu_check_parts.tar.gz $parts_json && rm -f $parts_json)
fi
"$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$OUT_DIR/gpu_check_summary.json"
