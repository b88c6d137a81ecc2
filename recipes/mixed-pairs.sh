#!/usr/bin/env bash
# Build the mixed image-text training set used by configs/align-mixed.yaml, plus the zero-shot test sets, from the
# real datasets (nothing is downloaded):
#   - the emoji pairs are the embedded demo shards (polymodal/demo_data/train/{0..2}; shard 3 stays held out),
#   - ImageNet samples, captioned "<label>, <WordNet gloss>" (1,000 photo-sentence pairs, shrunk to 256 px),
#   - 2,000 CIFAR-10 and 2,000 Fashion-MNIST training images, captioned from their class names with the templates
#     in recipes/label-caption-templates.txt (not the zero-shot prompts, which are the writer's defaults),
#   - CIFAR-10 and Fashion-MNIST test sets with classnames.txt for zero-shot classification.
#
# Usage: recipes/mixed-pairs.sh OUT_DIR [DATA_ROOT]
#   OUT_DIR    where the shards go (created); configs/align-mixed.yaml reads them from $MIXED_DATA, default
#              data-out/mixed under the folder you train from
#   DATA_ROOT  the shared datasets (default: ../shared/data beside this checkout)
#   PYTHON     environment variable: the interpreter with polymodal installed (default: the first of python3 and
#              python on PATH that imports polymodal)
# Runs from any folder and writes nothing but OUT_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"  # the header comment
  [ $# -ge 1 ] && exit 0 || exit 2
fi
out=$1
data=${2:-$here/../../shared/data}
if [ -z "${PYTHON:-}" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import polymodal" 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
[ -n "${PYTHON:-}" ] || { echo "mixed-pairs.sh: no python on PATH imports polymodal; set PYTHON=/path/to/venv/bin/python" >&2; exit 2; }
[ -d "$data" ] || { echo "mixed-pairs.sh: no datasets at $data; give DATA_ROOT" >&2; exit 2; }
fmnist_names="T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
templates="$here/label-caption-templates.txt"
shards() { "$PYTHON" -m polymodal data shards "$@" --overwrite -q; }

shards "$data/imagenet-samples/captions_wordnet.jsonl" "$out/imagenet" --caption "{label}, {gloss}" --resize 256 \
    --samples-per-shard 250
shards "$data/cifar10/train.tar.gz" "$out/cifar10-pairs" --limit 2000 --samples-per-shard 250 \
    --label-captions "$templates"
shards "$data/fashion-mnist/train-images-idx3-ubyte.gz" "$out/fmnist-pairs" --limit 2000 --samples-per-shard 250 \
    --classnames "$fmnist_names" --label-captions "$templates"
shards "$data/cifar10/test.tar.gz" "$out/cifar10" --split test
shards "$data/fashion-mnist/t10k-images-idx3-ubyte.gz" "$out/fmnist" --split test --classnames "$fmnist_names"
echo "mixed pairs and zero-shot sets in $out"
