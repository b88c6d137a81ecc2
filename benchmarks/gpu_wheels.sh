#!/usr/bin/env bash
# Brings into wheels/ (at the repository root; gitignored) what benchmarks/gpu_check.sh needs on a GPU machine that
# cannot reach a package index: the wheels listed in benchmarks/gpu_wheels.txt, for the target Python version(s),
# and the CIFAR-10 archives the GPU benchmarks and the GPU test read (wheels/data/cifar10/). Run it here, where
# pip reaches the registry; then carry the folder with the device tool (carry ["wheels"]). Prints the total size.
#
#   bash benchmarks/gpu_wheels.sh                       # for Python 3.11 and 3.12 (the GPU image has 3.12)
#   bash benchmarks/gpu_wheels.sh --python 3.12         # one target version (repeatable)
#   bash benchmarks/gpu_wheels.sh --fresh               # empty wheels/ first
#
# Options: --python X.Y (repeatable; default 3.11 and 3.12), --dir DIR (default wheels), --data-root DIR (the
# folder holding cifar10/; default ../shared/data beside the repository), --build-python PY (the interpreter that
# builds deepspeed's wheel: it needs torch, setuptools and wheel; default .venv/bin/python), --fourm-data DIR (the
# CIFAR 4M set recipes/4m.sh built, for the 4M token kit; default data-out/4m-cifar), --fresh.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
DIR=wheels
PYTHONS=()
DATA_ROOT="$REPO/../shared/data"
FOURM_DATA="$REPO/data-out/4m-cifar"
BUILD_PY="$REPO/.venv/bin/python"
FRESH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHONS+=("$2"); shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --data-root) DATA_ROOT=$2; shift 2 ;;
    --fourm-data) FOURM_DATA=$2; shift 2 ;;
    --build-python) BUILD_PY=$2; shift 2 ;;
    --fresh) FRESH=1; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#PYTHONS[@]} -gt 0 ] || PYTHONS=(3.11 3.12)
[ -x "$BUILD_PY" ] || { echo "FAIL: $BUILD_PY not found (pass --build-python: a Python with torch)" >&2; exit 2; }
PIP=("$BUILD_PY" -m pip)
[ "$FRESH" = 1 ] && rm -rf "$DIR"
mkdir -p "$DIR"

# Every manylinux platform tag a recent x86-64 Linux accepts (pip matches each one exactly).
PLATFORMS=()
for minor in $(seq 17 39); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

while read -r req kind; do
  pin=${req/>=/==}  # a floor ("newer") is fetched at that version
  case "$kind" in
    build)
      name=${req%%==*}
      if ! ls "$DIR"/"${name//-/_}"-"${req#*==}"-*.whl >/dev/null 2>&1; then
        echo "[build] $req: pip wheel --no-deps --no-build-isolation (pure Python; its ops are JIT-built there)"
        # DS_BUILD_OPS=0: no precompiled op, so the wheel does not depend on this machine's torch or CUDA.
        DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$DIR" "$req"
      fi ;;
    binary)
      for v in "${PYTHONS[@]}"; do
        echo "[fetch] $req for CPython $v"
        "${PIP[@]}" download -q --no-deps --only-binary=:all: --implementation cp --python-version "$v" \
          "${PLATFORMS[@]}" -d "$DIR" "$pin"
      done ;;
    site|newer|peer)
      echo "[fetch] $pin"
      "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "${PYTHONS[0]}" -d "$DIR" "$pin" ;;
    *) echo "FAIL: unknown kind '$kind' for $req in benchmarks/gpu_wheels.txt" >&2; exit 2 ;;
  esac
done < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' benchmarks/gpu_wheels.txt)

# The CIFAR-10 archives (test: the GPU test and engine_overhead; train: spark_step and eval_speed's probe).
mkdir -p "$DIR/data/cifar10"
for f in test.tar.gz train.tar.gz README.md; do
  src="$DATA_ROOT/cifar10/$f"
  [ -f "$src" ] || { echo "FAIL: $src not found (pass --data-root: the folder holding cifar10/)" >&2; exit 2; }
  cmp -s "$src" "$DIR/data/cifar10/$f" 2>/dev/null || cp "$src" "$DIR/data/cifar10/$f"
done

# The 4M token kit (fourm_step on the GPU): 8 shards (8,000 samples) of the CIFAR 4M set and their token sets, as
# recipes/4m.sh cifar builds them under --fourm-data (about 7.5 MB gzipped). Left out, with a note, when absent.
if [ -d "$FOURM_DATA/tokens/train" ]; then
  (cd "$FOURM_DATA" && tar czhf - train/cifar-{0..7}.tar tokens/train/*/tok_*/cifar-{0..7}.tar \
      tokens/train/*/stats.json tokens/train/*/_job.json) > "$DIR/data/4m-step-kit.tar.gz"
else
  echo "note: no 4M token sets under $FOURM_DATA (recipes/4m.sh cifar $FOURM_DATA builds them): the GPU check's" \
       "fourm_step part will say so and fail alone"
fi

# Check: each target version finds a wheel for every line.
status=0
for v in "${PYTHONS[@]}"; do
  "$BUILD_PY" benchmarks/gpu_kit.py resolve --wheels "$DIR" --python-version "$v" || status=1
done
# Extra files (other versions left from earlier runs) travel too: list them.
"$BUILD_PY" - "$DIR" "${PYTHONS[@]}" <<'EOF'
import subprocess, sys
from pathlib import Path
folder, versions = Path(sys.argv[1]), sys.argv[2:]
used = set()
for v in versions:
    out = subprocess.run([sys.executable, "benchmarks/gpu_kit.py", "resolve", "--wheels", str(folder),
                          "--python-version", v, "--format", "tsv"], capture_output=True, text=True).stdout
    used |= {line.split("\t")[2] for line in out.splitlines() if line.count("\t") == 2}
extra = sorted(p.name for p in folder.glob("*.whl") if p.name not in used)
if extra:
    print(f"not needed for {', '.join(versions)} (remove them, or use --fresh): {', '.join(extra)}")
EOF
wheels_bytes=$(find "$DIR" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s+=$1} END {print s+0}')
data_bytes=$(du -sb "$DIR/data" | cut -f1)
# The rest of what travels: tracked files and untracked ones git does not ignore (wheels/ itself left out, in case
# it is not ignored yet).
tree_bytes=$(git ls-files -z -co --exclude-standard | grep -zv "^${DIR%/}/" | xargs -0 -r stat -c %s 2>/dev/null |
  awk '{s+=$1} END {print s+0}')
total=$(( wheels_bytes + data_bytes ))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "wheels/: $(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l) wheels $(mib "$wheels_bytes") + data $(mib "$data_bytes") = $(mib "$total"); with the working tree that travels ($(mib "$tree_bytes")): $(mib $(( total + tree_bytes ))) of the 64 MiB limit"
if [ $(( total + tree_bytes )) -gt $(( 64 * 1048576 )) ]; then
  echo "FAIL: over the 64 MiB that travels to the device machine" >&2; exit 1
fi
exit $status
