#!/usr/bin/env bash
# Reproduce the paper's comparisons at a chosen scale: for every method and
# seed, pretrain the baseline and HVS (same seed), evaluate both with the
# weighted k-NN, and write results/summary.md with our numbers beside the
# paper's.  Re-running resumes unfinished runs and skips finished evaluations.
#
#   bash run_all.sh                                   # small CPU profile, SimSiam + SimCLR, ~15 min
#   bash run_all.sh --profile gpu --gpus 1            # CIFAR-10, about a GPU-hour
#   bash run_all.sh --profile paper --gpus 8 --data-dir /datasets   # ImageNet, Table 1
#
# Several nodes: TORCHRUN_ARGS="--nnodes 4 --rdzv-backend c10d --rdzv-endpoint host:29400"
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'EOF'
usage: bash run_all.sh [options]
  --profile small|gpu|gpu-tin|paper  scale to run (default small)
      small    RN18 (CIFAR stem), 1,500 CIFAR-10 images, 1 epoch, CPU (~15 min on 2 cores for both methods)
      gpu      RN18 (CIFAR stem), CIFAR-10, 100 epochs (about a GPU-hour per method)
      gpu-tin  RN18 (CIFAR stem), Tiny-ImageNet-100 at 64 px, 100 epochs
      paper    RN50, ImageNet, 100 epochs (the paper's Table 1 setting; configs/<method>_paper.yaml)
  --data-dir PATH     data root (default: $HVS_DATA_DIR); may hold cifar10.tar.gz etc.
  --gpus N            processes per node for torchrun (default: 0 = one process, CPU or 1 GPU)
  --seeds "0 1 2"     seeds (default "0")
  --methods "simsiam simclr"  methods to run (default: both)
  --paper-epochs 100|300      paper rows beside ours (300: the long schedule, 200 for SimCLR; default 100)
  --results DIR       results folder (default results)
  --runs DIR          checkpoints folder (default runs)
  Extra arguments after -- are passed to every training run as config overrides.
EOF
}

PROFILE=small; DATA_DIR="${HVS_DATA_DIR:-}"; GPUS=0; SEEDS="0"; METHODS="simsiam simclr"; PAPER_EPOCHS=100
RESULTS=results; RUNS=runs; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE="$2"; shift 2;;
    --data-dir) DATA_DIR="$2"; shift 2;;
    --gpus) GPUS="$2"; shift 2;;
    --seeds) SEEDS="$2"; shift 2;;
    --methods) METHODS="$2"; shift 2;;
    --paper-epochs) PAPER_EPOCHS="$2"; shift 2;;
    --results) RESULTS="$2"; shift 2;;
    --runs) RUNS="$2"; shift 2;;
    -h|--help) usage; exit 0;;
    --) shift; EXTRA=("$@"); break;;
    *) echo "run_all.sh: unknown option $1" >&2; usage >&2; exit 2;;
  esac
done
if [ -z "$DATA_DIR" ]; then
  echo "run_all.sh: no data directory: pass --data-dir PATH or set HVS_DATA_DIR (e.g. HVS_DATA_DIR=../shared/data)" >&2
  exit 2
fi
export HVS_DATA_DIR="$DATA_DIR"

# profile -> config file suffix, k-NN options, scale line of the summary, paper epochs
case "$PROFILE" in
  small)   CFG=small;              KNN=(--train-subset 1500 --test-subset 1000)
           SCALE="small CPU profile: ResNet-18 (CIFAR stem), 32 px, 1,500 CIFAR-10 training images, 1 epoch (23 steps of batch 64); k-NN bank = those 1,500 images, 1,000 test images";;
  gpu)     CFG=cifar10_gpu;        KNN=()
           SCALE="GPU profile: ResNet-18 (CIFAR stem), CIFAR-10 (50k images, 32 px), 100 epochs, batch 512; k-NN on the full test set";;
  gpu-tin) CFG=tiny_imagenet_gpu;  KNN=()
           SCALE="GPU profile: ResNet-18 (CIFAR stem), Tiny-ImageNet-100 (50k images, 64 px), 100 epochs, batch 512";;
  paper)   CFG=paper;              KNN=()
           SCALE="paper profile: ResNet-50, ImageNet, 100 epochs, batch 512 (SimSiam) / 4096 (SimCLR, Table 10)";;
  *) echo "run_all.sh: unknown profile '$PROFILE' (small, gpu, gpu-tin, paper)" >&2; exit 2;;
esac

if [ "$GPUS" -gt 0 ]; then
  LAUNCH=(torchrun --nproc_per_node "$GPUS" ${TORCHRUN_ARGS:-} -m)
else
  LAUNCH=(python -m)
fi

OUT="$RESULTS/$PROFILE"
mkdir -p "$OUT"
for method in $METHODS; do
  config="configs/${method}_${CFG}.yaml"
  [ -f "$config" ] || { echo "run_all.sh: no config $config for method $method" >&2; exit 2; }
  for seed in $SEEDS; do
    for variant in baseline hvs; do
      hvs=false; [ "$variant" = hvs ] && hvs=true
      run_dir="$RUNS/$PROFILE/${method}_${variant}_s${seed}"
      json="$OUT/${method}_${variant}_s${seed}_knn.json"
      echo "=== $method $variant seed $seed ($PROFILE) -> $run_dir" >&2
      "${LAUNCH[@]}" "$method.main" --config "$config" --output-dir "$run_dir" \
        "run.seed=$seed" "hvs.enabled=$hvs" ${EXTRA[@]+"${EXTRA[@]}"}
      if [ ! -f "$json" ] || [ "$run_dir/checkpoint.pth" -nt "$json" ]; then
        python -m eval.knn --checkpoint "$run_dir/checkpoint.pth" ${KNN[@]+"${KNN[@]}"} --output "$json"
      fi
    done
  done
done

python -m eval.summary --results "$OUT" --scale "$SCALE (seeds: $SEEDS)" --paper-epochs "$PAPER_EPOCHS" > /dev/null
cp "$OUT/summary.md" "$RESULTS/summary.md"
echo "wrote $RESULTS/summary.md" >&2
cat "$RESULTS/summary.md"
