#!/usr/bin/env bash
# MultiMAE against MAE against random init on CIFAR-10 (the MultiMAE issue's transfer test), at a CPU budget:
#   - MultiMAE: rgb + Canny edges + greyscale (derived on the device), 32 of 3 x 64 tokens visible (MultiMAE's 1/6),
#   - MAE: the same objective with rgb only, 16 of 64 visible (MAE's 75% mask),
#   - random init: the same encoder untrained (seed 0),
# all ViT encoders of width 128, depth 4, 4 heads, patch 4 at 32 px, trained for STEPS steps of 64 images, then
# linear probe and kNN on the full CIFAR-10 test set (probe and kNN fitted on the 50,000 training images).
#
# Usage: recipes/multimae-cifar-transfer.sh CIFAR_SHARDS OUT [STEPS]
#   CIFAR_SHARDS  `polymodal data shards` output with train/ and test/ (see configs/multimae-cifar.yaml)
#   OUT           run folders and eval JSON go here
#   STEPS         training steps per arm (default 8000: 10 epochs; about 55 min on 2 CPU cores for all three arms)
#   POLYMODAL     environment variable: the polymodal command (default: polymodal)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 2 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"  # the header comment
  [ $# -ge 1 ] && exit 0 || exit 2
fi
data=$1
out=$2
steps=${3:-8000}
pm=${POLYMODAL:-polymodal}
config=$here/../configs/multimae-cifar.yaml
small=(objective.dim=128 objective.depth=4 objective.heads=4 objective.decoder_dim=96 objective.decoder_depth=1
       objective.decoder_heads=4 data.batch_size=64 "steps=$steps" optim.warmup_steps=100 checkpoint.every=500
       "data.shards=$data/train" log.progress=false log.images_every=500)
mkdir -p "$out"
date
[ -f "$out/multimae/model.safetensors" ] || $pm pretrain "$config" "${small[@]}" "run_dir=$out/multimae" \
    objective.num_visible=32
date
[ -f "$out/mae/model.safetensors" ] || $pm pretrain "$config" "${small[@]}" "run_dir=$out/mae" \
    objective.modalities.edges=null objective.modalities.grey=null objective.num_visible=16
date
# Random init: the MAE arm's objective built from its config with seed 0 and exported untrained.
python "$here/random_init.py" "$out/mae/config.yaml" "$out/random-init.safetensors"
for arm in multimae mae random-init; do
  model=$out/$arm; [ "$arm" = random-init ] && model=$out/random-init.safetensors
  $pm eval --model "$model" --dataset "$data" --task linear_probe --task knn --image-size 32 \
      --output "$out/eval-$arm" -q
done
date
