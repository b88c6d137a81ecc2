#!/usr/bin/env bash
# A tiny 4M from raw files to held-out figures, on one of the 4M issue's two data sets (nothing is downloaded):
#   fmnist  Fashion-MNIST's 60,000 training images at 28 px: tok_rgb, tok_edges (Canny), tok_fgmask (a
#           class-painted segmentation: Otsu foreground = class id + 1), each 7x7 FSQ codes from a tokenizer of its
#           own; tok_caption ("a picture showing a {class}." and five other templates, not the zero-shot
#           prompts) and tok_metadata (4M's binned image metadata) through one WordPiece vocabulary.
#           Config: configs/4m-tiny-fmnist.yaml.
#   cifar   CIFAR-10's 50,000 training images (template captions) plus the emoji pairs (names as captions; the
#           demo's held-out shard left out) and the ImageNet samples ("{label}, {gloss}") at 32 px: tok_rgb and
#           tok_edges (8x8 FSQ codes), tok_caption, tok_palette and tok_metadata. Config: configs/4m-tiny-cifar.yaml.
# Then python -m polymodal.eval.fourm_heldout on the test images (cross-entropy against unigram per modality, image
# -> caption, caption -> image by MaskGIT and ROAR, chained caption -> [fgmask ->] edges -> image against caption ->
# image, edges -> image PSNR against the mean image), and polymodal eval (linear probe, kNN) of the encoder against
# the same model untrained.
#
# Usage: recipes/4m.sh fmnist|cifar OUT [STEPS]
#   OUT        data, tokenizers, the run (OUT/4m) and the figures (OUT/heldout.json, OUT/eval-*) go here; the
#              configs read data-out/4m-fmnist and data-out/4m-cifar, so those need no overrides
#   STEPS      4M training steps (default 3000: about 15-20 minutes on a 2-core CPU)
#   POLYMODAL  environment variable: the polymodal command (default: polymodal); PYTHON: its interpreter
#   DATA_ROOT  environment variable: the shared datasets (default: ../shared/data beside this checkout)
#   PRETRAIN_ARGS  environment variable: more key=value overrides for the 4M run, e.g. precision=bf16 (on a CPU
#              with bf16 instructions: `polymodal info` says whether it pays)
# Every step is skipped when its output exists, so an interrupted recipe picks up where it stopped.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 2 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"  # the header comment
  [ $# -ge 1 ] && [ "${1:-}" != fmnist ] && [ "${1:-}" != cifar ] && exit 0 || exit 2
fi
set_name=$1
out=$2
steps=${3:-3000}
pm=${POLYMODAL:-polymodal}
py=${PYTHON:-python}
raw=${DATA_ROOT:-$here/../../shared/data}
templates=$here/label-caption-templates.txt
configs=$here/../configs
case $set_name in fmnist|cifar) mkdir -p "$out" ;; *) echo "recipes/4m.sh: the data set is fmnist or cifar, not '$set_name'" >&2; exit 2 ;; esac
step() { echo "== $(date +%T) $*"; }
shards() {  # source out split extra...: write once
  local source=$1 dir=$2 split=$3; shift 3
  [ -f "$dir/$split/stats.json" ] || { step "shards $dir/$split"; $pm data shards "$source" "$dir" --split "$split" \
      -q "$@"; }
}

case $set_name in
  fmnist)
    names="T-shirt/top,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,ankle boot"
    shards "$raw/fashion-mnist/train-images-idx3-ubyte.gz" "$out/fmnist" train --classnames "$names" \
        --label-captions "$templates"
    shards "$raw/fashion-mnist/t10k-images-idx3-ubyte.gz" "$out/fmnist" test --classnames "$names" \
        --label-captions "$templates"
    labelled=$out/fmnist; train_src=$out/fmnist/train
    derived="edges,fgmask,metadata"; image_derived=(edges fgmask); text_derived=(metadata)
    config=$configs/4m-tiny-fmnist.yaml; size=28
    tokenizer_config() { echo "$configs/tokenizer-fsq-fmnist.yaml"; }
    tokenizer_overrides() {
      case $1 in
        edges) echo "objective.channels=1" ;;
        fgmask) echo "objective.channels=8 objective.classes=11 objective.levels=[5,5,5]" ;;
      esac
    }
    chain=(tok_fgmask tok_edges)
    ;;
  cifar)
    shards "$raw/cifar10/train.tar.gz" "$out/cifar" train --label-captions "$templates"
    shards "$raw/cifar10/test.tar.gz" "$out/cifar" test --label-captions "$templates"
    shards "$raw/emoji/captions.jsonl" "$out/parts" emoji --caption "{name}" --samples-per-shard 500  # as the demo shards: 3 is held out
    shards "$raw/imagenet-samples/captions_wordnet.jsonl" "$out/parts" imagenet --caption "{label}, {gloss}" \
        --resize 64 --samples-per-shard 250
    # One training set of all three, by links with distinct shard names (derived and token sets mirror the names).
    if [ ! -d "$out/train" ]; then
      mkdir -p "$out/train.tmp"
      for f in "$out"/cifar/train/*.tar; do ln -s "../cifar/train/$(basename "$f")" "$out/train.tmp/cifar-$(basename "$f")"; done
      for n in 0 1 2; do ln -s "../parts/emoji/$n.tar" "$out/train.tmp/emoji-$n.tar"; done  # 3: the demo's held out
      for f in "$out"/parts/imagenet/*.tar; do ln -s "../parts/imagenet/$(basename "$f")" "$out/train.tmp/imagenet-$(basename "$f")"; done
      mv "$out/train.tmp" "$out/train"
    fi
    labelled=$out/cifar; train_src=$out/train
    derived="edges,palette,metadata"; image_derived=(edges); text_derived=(palette metadata)
    config=$configs/4m-tiny-cifar.yaml; size=32
    tokenizer_config() { [ "$1" = rgb ] && echo "$configs/tokenizer-fsq-cifar.yaml" || echo "$configs/tokenizer-fsq-edges.yaml"; }
    tokenizer_overrides() { :; }
    chain=(tok_edges)
    ;;
esac
test_src=$labelled/test

for split in train test; do
  src=$train_src; [ $split = test ] && src=$test_src
  [ -f "$out/derived/$split/metadata/stats.json" ] || { step "derive $split"; $pm data derive "$src" \
      "$out/derived/$split" --add "$derived" --resume -q; }
done

# Text: one WordPiece vocabulary for every text modality (4M's); palettes and metadata are written in its bin and
# key tokens, which every vocabulary holds, so the captions alone train it.
[ -f "$out/wordpiece/tokenizer.json" ] || { step "wordpiece"; $pm tokenizer train-text "$train_src" \
    --vocab-size 3000 -o "$out/wordpiece"; }

# Image-like: one FSQ tokenizer per modality (4M's), each on its own training set.
for m in rgb "${image_derived[@]}"; do
  join="[]"; [ $m = rgb ] || join="[$out/derived/train/$m]"
  # shellcheck disable=SC2046  # the overrides are words on purpose
  [ -f "$out/tok-$m/model.safetensors" ] || { step "tokenizer $m"; $pm pretrain "$(tokenizer_config $m)" \
      "run_dir=$out/tok-$m" "data.shards=$train_src" "data.join=$join" "data.modalities=[$m]" \
      "objective.modality=$m" "data.image_size=$size" log.progress=false $(tokenizer_overrides $m); }
done

# Token sets: one tokenize job (and folder) per source set, OUT/tokens/SPLIT/<job>/tok_<modality>; the stored crops
# line up across jobs (seeded by shard name and sample index, and the derived sets keep the source's names).
for split in train test; do
  src=$train_src; [ $split = test ] && src=$test_src
  crops=$([ $split = train ] && echo 2 || echo 1)
  t=$out/tokens/$split
  [ -f "$t/image/tok_rgb/stats.json" ] || { step "tokenize $split rgb, caption"; $pm data tokenize "$src" \
      "$t/image" --tokenizer "rgb=$out/tok-rgb" --text "caption=$out/wordpiece" --crops $crops --resume -q; }
  for m in "${image_derived[@]}"; do
    [ -f "$t/$m/tok_$m/stats.json" ] || { step "tokenize $split $m"; $pm data tokenize "$out/derived/$split/$m" \
        "$t/$m" --tokenizer "$m=$out/tok-$m" --crops $crops --resume -q; }
  done
  for m in "${text_derived[@]}"; do
    [ -f "$t/$m/tok_$m/stats.json" ] || { step "tokenize $split $m"; $pm data tokenize "$out/derived/$split/$m" \
        "$t/$m" --text "$m=$out/wordpiece" --resume -q; }
  done
done

joins() {  # split: every token set, as data.join lists them
  local t=$out/tokens/$1 m
  echo "$t/image/tok_rgb $t/image/tok_caption"
  for m in "${image_derived[@]}" "${text_derived[@]}"; do echo "$t/$m/tok_$m"; done
}
vocab=$($py -c "import json, sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$out/wordpiece/stats.json")
overrides=("data.shards=$train_src" "data.join=[$(joins train | tr '\n' ' ' | sed 's/ *$//; s/ /,/g')]"
           "objective.modalities.tok_rgb.tokenizer=$out/tok-rgb")
for m in "${image_derived[@]}"; do overrides+=("objective.modalities.tok_$m.tokenizer=$out/tok-$m"); done
for m in caption "${text_derived[@]}"; do
  overrides+=("objective.modalities.tok_$m.tokenizer=$out/wordpiece" "objective.modalities.tok_$m.vocab_size=$vocab")
done
run=$out/4m
read -ra extra <<< "${PRETRAIN_ARGS:-}"
[ -f "$run/model.safetensors" ] || { step "4m pretrain, $steps steps"; $pm pretrain "$config" "run_dir=$run" \
    "steps=$steps" log.progress=false "${overrides[@]}" "${extra[@]}"; }

# Held out: the test images with their own tokens (2,000 of them for the token figures).
# shellcheck disable=SC2046
[ -f "$out/heldout.json" ] || { step "held-out figures"; $py -m polymodal.eval.fourm_heldout "$run" \
    --test "$test_src" --test-join $(joins test) --train "$train_src" --train-join $(joins train) \
    --classnames "$labelled/classnames.txt" --generate maskgit:4 maskgit:8 maskgit:16 roar:4 roar:8 roar:16 \
    --chain "${chain[@]}" --psnr-from tok_edges --out "$out/heldout.json" > /dev/null; }
# The encoder's features (images -> tok_rgb -> encoder, mean-pooled) against the same model untrained.
[ -f "$out/random-init.safetensors" ] || $py "$here/random_init.py" "$run/config.yaml" \
    "$out/random-init.safetensors" $size
for arm in 4m random-init; do
  model=$run; [ $arm = random-init ] && model=$out/random-init.safetensors
  [ -d "$out/eval-$arm" ] || { step "linear probe and kNN: $arm"; $pm eval --model "$model" --dataset "$labelled" \
      --task linear_probe --task knn --image-size $size --output "$out/eval-$arm" -q; }
done
[ -f "$out/generations.png" ] || $py "$here/4m_grid.py" "$run" "$labelled/classnames.txt" "$out/generations.png" \
    --chain "${chain[@]}"
step "done: $out/heldout.json, $out/eval-4m, $out/eval-random-init, $out/generations.png"
