#!/usr/bin/env bash
# Build the mixed image-text training set used by configs/align-mixed.yaml and configs/clip-mixed.yaml, plus the
# zero-shot test sets, from ../shared/data (the real datasets; nothing is downloaded):
#   - the emoji pairs are the embedded demo shards (polymodal/demo_data/train/{0..2}; shard 3 stays held out),
#   - ImageNet samples, captioned "<label>, <WordNet gloss>" (1,000 photo-sentence pairs, shrunk to 256 px),
#   - 2,000 CIFAR-10 and 2,000 Fashion-MNIST training images, captioned from their class names with the templates
#     in recipes/label-caption-templates.txt (not the zero-shot prompts, which are the writer's defaults),
#   - CIFAR-10 and Fashion-MNIST test sets with classnames.txt for zero-shot classification.
# Usage: recipes/mixed-pairs.sh [OUT_DIR (default data-out/mixed)] [DATA_ROOT (default ../shared/data)]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-data-out/mixed}
data=${2:-../shared/data}
py=${PYTHON:-.venv/bin/python}
fmnist_names="T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
shards() { "$py" -m polymodal data shards "$@" --overwrite -q; }

shards "$data/imagenet-samples/captions_wordnet.jsonl" "$out/imagenet" --caption "{label}, {gloss}" --resize 256 \
    --samples-per-shard 250
shards "$data/cifar10/train.tar.gz" "$out/cifar10-pairs" --limit 2000 --samples-per-shard 250 \
    --label-captions recipes/label-caption-templates.txt
shards "$data/fashion-mnist/train-images-idx3-ubyte.gz" "$out/fmnist-pairs" --limit 2000 --samples-per-shard 250 \
    --classnames "$fmnist_names" --label-captions recipes/label-caption-templates.txt
shards "$data/cifar10/test.tar.gz" "$out/cifar10" --split test
shards "$data/fashion-mnist/t10k-images-idx3-ubyte.gz" "$out/fmnist" --split test --classnames "$fmnist_names"
echo "mixed pairs and zero-shot sets in $out"
