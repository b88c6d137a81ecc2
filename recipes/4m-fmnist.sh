#!/usr/bin/env bash
# A tiny 4M on Fashion-MNIST with five modalities, from the raw IDX files to held-out figures (the 4M issue's
# first data set; nothing is downloaded):
#   tok_rgb      the image, 7x7 FSQ tokens (1,000 codes) at 28 px
#   tok_edges    its Canny edges, 7x7 FSQ tokens (1,000 codes)
#   tok_fgmask   a class-painted segmentation (Otsu foreground = class id + 1), 7x7 FSQ tokens (125 codes)
#   tok_caption  "a picture showing a {class}." and five other templates (not the zero-shot prompts), WordPiece
#   tok_metadata 4M-style binned image metadata ("v1=<key> v0=<bin> ..."), WordPiece
# then configs/4m-tiny-fmnist.yaml, and python -m polymodal.eval.fourm_heldout on the 10,000 test images (cross-
# entropy against unigram, image -> caption, caption -> image, chained caption -> fgmask -> edges -> image, edges
# -> image PSNR), and polymodal eval (linear probe, kNN) of the encoder.
#
# Usage: recipes/4m-fmnist.sh OUT [STEPS]
#   OUT        data, tokenizers, the run and the figures go here (about 1.5 GB)
#   STEPS      4M training steps (default 3000: about 25 minutes on a 2-core CPU)
#   POLYMODAL  environment variable: the polymodal command (default: polymodal)
# Every step is skipped when its output exists, so an interrupted recipe picks up where it stopped.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  [ $# -ge 1 ] && exit 0 || exit 2
fi
out=$1
steps=${2:-3000}
pm=${POLYMODAL:-polymodal}
py=${PYTHON:-python}
raw=${FMNIST:-$here/../../shared/data/fashion-mnist}
names="T-shirt/top,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,ankle boot"
mkdir -p "$out"
step() { echo "== $(date +%T) $*"; }

for split in train test; do
  idx=$([ $split = train ] && echo train || echo t10k)
  [ -f "$out/fmnist/$split/stats.json" ] || { step "shards $split"; $pm data shards "$raw/$idx-images-idx3-ubyte.gz" \
      "$out/fmnist" --split $split --classnames "$names" --label-captions "$here/label-caption-templates.txt" -q; }
  [ -f "$out/derived/$split/metadata/stats.json" ] || { step "derive $split"; $pm data derive "$out/fmnist/$split" \
      "$out/derived/$split" --add edges,fgmask,metadata --classnames "$names" --resume -q; }
done

# Text: one WordPiece vocabulary for captions and metadata (4M's: one vocabulary for every text modality; metadata
# is written in its bin and key tokens, which every vocabulary holds, so the captions alone train it).
[ -f "$out/wordpiece/tokenizer.json" ] || { step "wordpiece"; $pm tokenizer train-text "$out/fmnist/train" \
    --vocab-size 2000 -o "$out/wordpiece"; }

# Image-like: one FSQ tokenizer per modality (4M's: a tokenizer per modality), each on its own training set.
tok() {  # name modality join extra...
  local name=$1 modality=$2 join=$3; shift 3
  [ -f "$out/tok-$name/model.safetensors" ] || { step "tokenizer $name"; $pm pretrain \
      "$here/../configs/tokenizer-fsq-fmnist.yaml" "run_dir=$out/tok-$name" "data.shards=$out/fmnist/train" \
      "data.join=$join" "data.modalities=[$modality]" "objective.modality=$modality" "$@"; }
}
tok rgb rgb "[]"
tok edges edges "[$out/derived/train/edges]" objective.channels=1
tok fgmask fgmask "[$out/derived/train/fgmask]" objective.channels=8 objective.classes=11 "objective.levels=[5,5,5]"

# Token sets: one tokenize job (and folder) per source set, OUT/tokens/SPLIT/<job>/tok_<modality>; the stored crops
# line up across jobs (seeded by shard name and sample index, and the derived sets keep the source's names).
for split in train test; do
  crops=$([ $split = train ] && echo 2 || echo 1)
  t=$out/tokens/$split
  [ -f "$t/image/tok_rgb/stats.json" ] || { step "tokenize $split rgb, caption"; $pm data tokenize \
      "$out/fmnist/$split" "$t/image" --tokenizer "rgb=$out/tok-rgb" --text "caption=$out/wordpiece" \
      --crops $crops --resume -q; }
  for m in edges fgmask; do
    [ -f "$t/$m/tok_$m/stats.json" ] || { step "tokenize $split $m"; $pm data tokenize "$out/derived/$split/$m" \
        "$t/$m" --tokenizer "$m=$out/tok-$m" --crops $crops --resume -q; }
  done
  [ -f "$t/metadata/tok_metadata/stats.json" ] || { step "tokenize $split metadata"; $pm data tokenize \
      "$out/derived/$split/metadata" "$t/metadata" --text "metadata=$out/wordpiece" --resume -q; }
done

# 4M: configs/4m-tiny-fmnist.yaml with its paths under OUT.
run=$out/4m
paths=("data.shards=$out/fmnist/train"
       "data.join=[$out/tokens/train/image/tok_rgb,$out/tokens/train/edges/tok_edges,$out/tokens/train/fgmask/tok_fgmask,$out/tokens/train/image/tok_caption,$out/tokens/train/metadata/tok_metadata]"
       "objective.modalities.tok_rgb.tokenizer=$out/tok-rgb" "objective.modalities.tok_edges.tokenizer=$out/tok-edges"
       "objective.modalities.tok_fgmask.tokenizer=$out/tok-fgmask"
       "objective.modalities.tok_caption.tokenizer=$out/wordpiece"
       "objective.modalities.tok_metadata.tokenizer=$out/wordpiece")
[ -f "$run/model.safetensors" ] || { step "4m pretrain, $steps steps"; $pm pretrain \
    "$here/../configs/4m-tiny-fmnist.yaml" "run_dir=$run" "steps=$steps" "${paths[@]}"; }

# Held out: the 10,000 test images with their own tokens (2,000 of them for the token figures).
joins() {  # split: the five token sets
  local t=$out/tokens/$1
  echo "$t/image/tok_rgb $t/edges/tok_edges $t/fgmask/tok_fgmask $t/image/tok_caption $t/metadata/tok_metadata"
}
[ -f "$out/heldout.json" ] || { step "held-out figures"; $py -m polymodal.eval.fourm_heldout "$run" \
    --test "$out/fmnist/test" --test-join $(joins test) --train "$out/fmnist/train" \
    --train-join $(joins train) --classnames "$out/fmnist/classnames.txt" \
    --generate maskgit:4 maskgit:8 maskgit:16 roar:4 roar:8 roar:16 --chain tok_fgmask tok_edges \
    --psnr-from tok_edges --out "$out/heldout.json" > /dev/null; }
# The encoder's features (images -> tok_rgb -> encoder, mean-pooled) against the same model untrained.
[ -f "$out/random-init.safetensors" ] || $py "$here/random_init.py" "$run/config.yaml" \
    "$out/random-init.safetensors" 28
for arm in 4m random-init; do
  model=$run; [ $arm = random-init ] && model=$out/random-init.safetensors
  [ -d "$out/eval-$arm" ] || { step "linear probe and kNN: $arm"; $pm eval --model "$model" --dataset "$out/fmnist" \
      --task linear_probe --task knn --image-size 28 --output "$out/eval-$arm" -q; }
done
step "done: $out/heldout.json, $out/eval-4m, $out/eval-random-init"
