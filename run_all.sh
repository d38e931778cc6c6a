#!/usr/bin/env bash
# Reproduce the paper's comparisons at a chosen scale: for every method and
# seed, pretrain the baseline and HVS (same seed) and evaluate both with the
# weighted k-NN and the method's linear probe (Table 1), transfer the Table 2
# methods to other datasets with a linear probe and finetuning (Table 2), draw
# the attention maps of the ViT methods (Appendix J), fine-tune the ResNets for
# detection with Detectron2 (Tables 3 and 7), and write results/summary.md
# with our numbers beside the paper's.  Re-running resumes unfinished runs and
# skips finished evaluations.
#
#   bash run_all.sh                                   # small CPU profile: SimSiam, SimCLR, DINO, iBOT, ~40 min
#   bash run_all.sh --methods "simsiam simclr"        # the two ResNet methods only
#   bash run_all.sh --methods "byol mocov3 barlowtwins vicreg"   # the methods beyond the paper
#   bash run_all.sh --profile medium                  # CPU, full CIFAR-10, 3 seeds, built to show signal (docs/evidence.md)
#   bash run_all.sh --profile gpu --gpus 1            # CIFAR-10, about a GPU-hour per ResNet method
#   bash run_all.sh --profile paper --gpus 8 --data-dir /datasets   # ImageNet, Tables 1 and 2
#
# A method token is declared by its method (`python -m common.engine.registry --list tokens`
# lists them with their entry points); its config is named after it: dino_resnet runs
# `python -m dino.main --config configs/dino_resnet_<profile config>.yaml` and writes
# dino_resnet_*_knn.json.
#
# Several nodes: TORCHRUN_ARGS="--nnodes 4 --rdzv-backend c10d --rdzv-endpoint host:29400"; detection
# takes Detectron2's: DETECTION_LAUNCH="--num-machines 4 --machine-rank R --dist-url tcp://host:29500"
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'EOF'
usage: bash run_all.sh [options]
  --profile small|medium|gpu|gpu-tin|paper  scale to run (default small)
      small    1,500 CIFAR-10 images, 1 epoch, CPU: RN18 (CIFAR stem) for SimSiam, SimCLR and
               dino_resnet, ViT-tiny/4 with 32 px global and 16 px local crops for DINO (8 local
               crops) and iBOT (10 local crops) (configs/<method>_small.yaml; baseline + HVS at
               23 steps on 2 cores: pretraining SimSiam + SimCLR ~6 min, DINO ~6 min, iBOT ~7 min,
               dino_resnet ~16 min; evaluation ~18 min, most of it the transfer of SimSiam and DINO)
      medium   CPU, built to show signal on two cores (docs/evidence.md): SimCLR with a narrow
               ResNet-18 (resnet18_w16, CIFAR stem) on all 50,000 CIFAR-10 training images at 32 px,
               batch 128, 10 epochs, bf16 autocast where the CPU has it; baseline + HVS, seeds "0 1 2"
               (about 3.1 to 3.4 hours on two cores); k-NN and the fast linear probe
               (configs/linear_medium.yaml) on the full 10,000-image test set; the analyses of the HVS
               selection logs (--evals selection).  Resumable: re-run the same command to go on
               (or run it in parts: --seeds 0, then --seeds 1, ...).  SimSiam: --methods "simclr simsiam"
               (configs/simsiam_medium.yaml; doubles the time)
      gpu      CIFAR-10, 100 epochs, same backbones (<method>_cifar10_gpu.yaml; SimSiam and SimCLR about
               a GPU-hour each; DINO and iBOT not yet timed on a GPU)
      gpu-tin  Tiny-ImageNet-100 at 64 px, 100 epochs; DINO's and iBOT's ViT-tiny with 8 px patches
               (<method>_tiny_imagenet_gpu.yaml)
      paper    ImageNet, 100 epochs, the paper's Table 1 setting: RN50 for SimSiam, SimCLR and
               dino_resnet, ViT-S/16 for DINO and iBOT (configs/<method>_paper.yaml; the long
               schedules, {simsiam,dino,ibot}_paper_300ep.yaml and simclr_paper_200ep.yaml, are
               run by hand)
  --data-dir PATH     data root (default: $HVS_DATA_DIR); may hold cifar10.tar.gz etc.
  --gpus N            processes per node for torchrun (default: 0 = one process, CPU or 1 GPU)
  --seeds "0 1 2"     seeds (default "0"; medium: "0 1 2")
  --methods "simsiam simclr dino ibot"  method tokens to run (default: these four); one of
                      simsiam, simclr, dino (ViT), dino_resnet (DINO with a ResNet), ibot (ViT), and
                      beyond the paper (their paper columns say "no paper number"): byol, mocov3,
                      mocov3_vit (ViT; small and paper profiles), barlowtwins, vicreg
  --paper-epochs 100|300      paper rows beside ours (300: the long schedule, 200 for SimCLR; default 100)
  --evals "knn linear transfer attention detection"   evaluations to run (default: the first four, and
                      detection in the paper profile, and in the others when Detectron2 is importable;
                      medium: "knn linear selection")
      knn        weighted k-NN on the pretraining dataset (Table 1)
      linear     the method's linear probe on the pretraining dataset (Table 1); small profile: fast
                 mode (configs/linear_small.yaml), gpu: the full protocol, paper: the protocol
      transfer   linear probe and finetuning on the transfer datasets (Table 2), for the methods
                 of --transfer-methods
      attention  attention maps of the ViT methods, HVS above the baseline (Appendix J)
      selection  the analyses of every HVS run's selection log (analysis/): IoU of the selected views
                 (the lowest-IoU fraction per epoch with its interval beside chance), fANOVA with its
                 permutation null, predictability; no extra training runs
      analysis   the paper's Section 5 (not in the default): selection, and the runs of the
                 experiments: easy selection, N = 8 views and static colour (SimSiam), the manual IoU
                 policies (--iou-policies; SimSiam and DINO) and the STN adversary (--stn-modes; DINO),
                 each with a linear probe
      detection  fine-tune the ResNets of --detection-methods for detection with Detectron2 (Tables 3
                 and 7; needs Detectron2, see docs/detection.md); small/gpu profiles: Faster R-CNN with the
                 ResNet-18 on the raccoon set (detection/configs/voc_small.yaml, 150 steps of batch 2,
                 ~5 min per checkpoint on 2 cores: ~10 min for SimSiam's baseline and HVS); paper:
                 VOC07+12 (48k steps) and COCO (90k steps) with R50-C4, as the paper
  --transfer "D ..."  transfer datasets (default: small, gpu: tiny-imagenet-100; gpu-tin: cifar10;
                      paper: cifar10 cifar100 flowers102 inat21 food101)
  --transfer-methods "simsiam dino"   method tokens transferred (default: these two, as Table 2)
  --detection-methods "simsiam dino_resnet"   ResNet method tokens fine-tuned for detection (default:
                      these two, as Table 3; only those also in --methods run)
  --iou-policies "..."  Table 5's manual IoU policies run with --evals analysis, for SimSiam and DINO
                      (configs/analysis/<policy>.yaml; default small: "iou_0.30-0.35 iou_0.30-0.35_alt
                      iou_0.40-0.60", other profiles: all six of the table)
  --stn-modes "..."   Table 6's STN modes run with --evals analysis when DINO is in --methods (default
                      small: "translation-scale-sym translation-scale affine", other profiles: all six)
  --results DIR       results folder (default results)
  --runs DIR          checkpoints folder (default runs)
  Extra arguments after -- are passed to every training run as config overrides.
EOF
}

PROFILE=small; DATA_DIR="${HVS_DATA_DIR:-}"; GPUS=0; SEEDS=default; METHODS=default; PAPER_EPOCHS=100
RESULTS=results; RUNS=runs; EXTRA=(); EVALS=default; TRANSFER=default
TRANSFER_METHODS="simsiam dino"; DETECTION_METHODS="simsiam dino_resnet"; IOU_POLICIES=default; STN_MODES=default
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE="$2"; shift 2;;
    --data-dir) DATA_DIR="$2"; shift 2;;
    --gpus) GPUS="$2"; shift 2;;
    --seeds) SEEDS="$2"; shift 2;;
    --methods) METHODS="$2"; shift 2;;
    --paper-epochs) PAPER_EPOCHS="$2"; shift 2;;
    --evals) EVALS="$2"; shift 2;;
    --transfer) TRANSFER="$2"; shift 2;;
    --transfer-methods) TRANSFER_METHODS="$2"; shift 2;;
    --detection-methods) DETECTION_METHODS="$2"; shift 2;;
    --iou-policies) IOU_POLICIES="$2"; shift 2;;
    --stn-modes) STN_MODES="$2"; shift 2;;
    --results) RESULTS="$2"; shift 2;;
    --runs) RUNS="$2"; shift 2;;
    -h|--help) usage; exit 0;;
    --) shift; EXTRA=("$@"); break;;
    *) echo "run_all.sh: unknown option $1" >&2; usage >&2; exit 2;;
  esac
done
whole_number() {  # whole_number OPTION VALUE MIN: a whole number >= MIN, or one line and exit 2
  case "$2" in
    ''|*[!0-9]*) echo "run_all.sh: $1 '$2': not a whole number (>= $3)" >&2; exit 2;;
  esac
  if [ "$2" -lt "$3" ]; then echo "run_all.sh: $1 $2: below $3" >&2; exit 2; fi
}
whole_number --gpus "$GPUS" 0
whole_number --paper-epochs "$PAPER_EPOCHS" 1
if [ "$SEEDS" != default ]; then  # the profile's default seeds are resolved below
  [ -n "${SEEDS// /}" ] || { echo "run_all.sh: --seeds '': no seed given" >&2; exit 2; }
  for seed in $SEEDS; do whole_number --seeds "$seed" 0; done
fi
if [ -z "$DATA_DIR" ]; then
  echo "run_all.sh: no data directory: pass --data-dir PATH or set HVS_DATA_DIR (e.g. HVS_DATA_DIR=../shared/data)" >&2
  exit 2
fi
export HVS_DATA_DIR="$DATA_DIR"

# profile defaults that the options override; the selection analyses' options (fANOVA rows and
# null shuffles, predictability rows) are the analyses' own defaults unless a profile sets them
DEFAULT_SEEDS="0"; DEFAULT_METHODS="simsiam simclr dino ibot"; DEFAULT_EVALS=""; SELECTION_ARGS=(); PREDICT_ARGS=()
# profile -> config file suffix, k-NN options, scale line of the summary, evaluation settings:
# LIN / FT: extra configs of eval.linear / eval.finetune (layered on the method's protocol),
# T1 / TR: data subsets of Table 1's and Table 2's evaluations, TRANSFER_DEFAULT: Table 2's datasets
case "$PROFILE" in
  small)   CFG=small;              KNN=(data.train_subset=1500 data.test_subset=1000)
           LIN=(--config configs/linear_small.yaml); FT=(--config configs/finetune_small.yaml)
           T1=(data.train_subset=1500 data.test_subset=1000); TR=(data.train_subset=5000 data.test_subset=2000)
           TRANSFER_DEFAULT="tiny-imagenet-100"; DETECTION=(raccoon:voc_small)
           SCALE="small CPU profile: 1,500 CIFAR-10 training images, 1 epoch (23 steps of batch 64); ResNet-18 (CIFAR stem) at 32 px for SimSiam, SimCLR and DINO-ResNet; DINO's ViT-tiny/4 with 2 global crops of 32 px and 8 local crops of 16 px (4,096 prototypes); iBOT's ViT-tiny/4 with 2 block-masked global crops of 32 px and 10 local crops of 16 px (4,096 prototypes shared by [CLS] and patch tokens); BYOL, MoCo v3, Barlow Twins and VICReg (beyond the paper): ResNet-18 (CIFAR stem) at 32 px, MoCo v3's ViT: ViT-tiny/4 at 32 px; k-NN bank and linear probe = those 1,500 images, 1,000 test images; linear probe in fast mode (configs/linear_small.yaml); transfer to Tiny-ImageNet-100 at 32 px (5,000 training images, 2,000 test images): linear probe (fast mode) and finetuning (1 epoch, configs/finetune_small.yaml)";;
  medium)  CFG=medium;             KNN=()
           LIN=(--config configs/linear_medium.yaml); FT=(); T1=(); TR=()
           TRANSFER_DEFAULT="none"; DETECTION=()
           DEFAULT_SEEDS="0 1 2"; DEFAULT_METHODS="simclr"; DEFAULT_EVALS="knn linear selection"
           SELECTION_ARGS=(--max-rows 30000 --null-shuffles 20); PREDICT_ARGS=(--max-rows 4000)
           SCALE="medium CPU profile: all 50,000 CIFAR-10 training images at 32 px, ResNet-18 with 16 channels in its first stage (resnet18_w16, CIFAR stem), batch 128, 10 epochs, bf16 autocast of the training step, channels_last (configs/<method>_medium.yaml); HVS N = 4; k-NN bank and linear probe: the 50,000 training images, tested on all 10,000 test images; linear probe in fast mode at batch 4,096 (configs/linear_medium.yaml); fANOVA on 30,000 rows per run with a 20-shuffle permutation null; predictability on 4,000 samples per run";;
  gpu)     CFG=cifar10_gpu;        KNN=()
           LIN=(--config configs/linear_gpu.yaml); FT=(--config configs/finetune_gpu.yaml); T1=(); TR=()
           TRANSFER_DEFAULT="tiny-imagenet-100"; DETECTION=(raccoon:voc_small)
           SCALE="GPU profile: CIFAR-10 (50k images, 32 px), 100 epochs; ResNet-18 (CIFAR stem), batch 512 (SimSiam, SimCLR) / 256 (DINO-ResNet); DINO's ViT-tiny/4 with 32/16 px global/local crops, batch 256; iBOT's ViT-tiny/4 with 2 x 32 px + 10 x 16 px crops, batch 256; k-NN on the full test set; linear probe: the method's full protocol; transfer to Tiny-ImageNet-100 at 32 px (configs/finetune_gpu.yaml)";;
  gpu-tin) CFG=tiny_imagenet_gpu;  KNN=()
           LIN=(--config configs/linear_gpu.yaml); FT=(--config configs/finetune_gpu.yaml); T1=(); TR=()
           TRANSFER_DEFAULT="cifar10"; DETECTION=(raccoon:voc_small)
           SCALE="GPU profile: Tiny-ImageNet-100 (50k images, 64 px), 100 epochs; ResNet-18 (CIFAR stem), batch 512 (SimSiam, SimCLR) / 256 (DINO-ResNet); DINO's ViT-tiny/8 with 64/32 px global/local crops, batch 256; iBOT's ViT-tiny/8 with 2 x 64 px + 10 x 32 px crops, batch 256; linear probe: the method's full protocol; transfer to CIFAR-10 at 64 px (configs/finetune_gpu.yaml)";;
  paper)   CFG=paper;              KNN=()
           LIN=(); FT=(); T1=(); TR=()
           TRANSFER_DEFAULT="cifar10 cifar100 flowers102 inat21 food101"
           DETECTION=(voc:voc_R_50_C4_48k coco:coco_R_50_C4_90k)
           SCALE="paper profile: ImageNet, 100 epochs; ResNet-50, batch 512 (SimSiam, DINO-ResNet) / 4096 (SimCLR, Table 10); DINO's ViT-S/16 with 224/96 px global/local crops, batch 512; iBOT's ViT-S/16 with 2 x 224 px + 10 x 96 px crops (8,192 shared prototypes), batch 512; linear probe: the method's protocol; transfer at 224 px with Tables 11 and 12";;
  *) echo "run_all.sh: unknown profile '$PROFILE' (small, medium, gpu, gpu-tin, paper)" >&2; exit 2;;
esac
[ "$TRANSFER" = default ] && TRANSFER="$TRANSFER_DEFAULT"
[ "$SEEDS" = default ] && SEEDS="$DEFAULT_SEEDS"
[ "$METHODS" = default ] && METHODS="$DEFAULT_METHODS"
ALL_POLICIES="iou_0.30-0.35 iou_0.30-0.35_alt iou_0.40-0.60 iou_0.40-0.60_alt iou_0.10-0.80 iou_1.00-0.10"
ALL_STN="translation-scale-sym translation-scale rotation-translation rotation-translation-scale rotation-translation-scale-sym affine"
if [ "$PROFILE" = small ]; then
  [ "$IOU_POLICIES" = default ] && IOU_POLICIES="iou_0.30-0.35 iou_0.30-0.35_alt iou_0.40-0.60"
  [ "$STN_MODES" = default ] && STN_MODES="translation-scale-sym translation-scale affine"
  STN_CFG=small
else
  [ "$IOU_POLICIES" = default ] && IOU_POLICIES="$ALL_POLICIES"
  [ "$STN_MODES" = default ] && STN_MODES="$ALL_STN"
  STN_CFG=cifar10_gpu  # Table 6 is DINO ViT-tiny on CIFAR-10 whatever the profile
fi
for policy in $IOU_POLICIES; do
  [ -f "configs/analysis/$policy.yaml" ] || { echo "run_all.sh: unknown IoU policy '$policy' (one of: $ALL_POLICIES)" >&2; exit 2; }
done
for mode in $STN_MODES; do
  [[ " $ALL_STN " == *" $mode "* ]] || { echo "run_all.sh: unknown STN mode '$mode' (one of: $ALL_STN)" >&2; exit 2; }
done
[ "$TRANSFER" = none ] && TRANSFER=""
HAVE_D2=false; python -c "import detectron2" 2>/dev/null && HAVE_D2=true
if [ "$EVALS" = default ] && [ -n "$DEFAULT_EVALS" ]; then EVALS="$DEFAULT_EVALS"; fi
if [ "$EVALS" = default ]; then
  EVALS="knn linear transfer attention"
  if [ "$PROFILE" = paper ] || $HAVE_D2; then EVALS="$EVALS detection"; fi
fi
for e in $EVALS; do
  case "$e" in knn|linear|transfer|attention|detection|selection|analysis) ;; *) echo "run_all.sh: unknown evaluation '$e' (knn, linear, transfer, attention, detection, selection, analysis)" >&2; exit 2;; esac
done
has() { [[ " $EVALS " == *" $1 "* ]]; }
if has detection && ! $HAVE_D2; then
  echo "run_all.sh: --evals detection needs Detectron2, which is not importable: install it (docs/detection.md), or leave detection out of --evals" >&2
  exit 2
fi
# a result is (re)computed when missing or older than the checkpoint it evaluates
stale() { [ ! -f "$1" ] || [ "$2" -nt "$1" ]; }
# timed LABEL COMMAND...: run COMMAND and add its wall time to $OUT/timings.tsv (label, seconds, end time);
# the summary sums the rows of a label, so a run done in parts counts all of them
timed() {
  local label="$1" t0=$SECONDS; shift
  "$@"
  printf '%s\t%s\t%s\n' "$label" "$((SECONDS - t0))" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$OUT/timings.tsv"
}

if [ "$GPUS" -gt 0 ]; then
  LAUNCH=(torchrun --nproc_per_node "$GPUS" ${TORCHRUN_ARGS:-} -m)
else
  LAUNCH=(python -m)
fi
# the small profile's fast linear probe runs in one process
LIN_LAUNCH=("${LAUNCH[@]}"); [ "$PROFILE" = small ] && LIN_LAUNCH=(python -m)

# the method tokens and their entry points, as the methods declare them (common/engine/registry.py):
# lines "<token> <entry module> <family>"; a token's config is named after the whole token;
# all checked before the first run starts
declare -A ENTRY=()
while read -r token module _; do ENTRY[$token]="$module"; done < <(python -m common.engine.registry --list tokens)
[ "${#ENTRY[@]}" -gt 0 ] || { echo "run_all.sh: python -m common.engine.registry --list tokens listed no method token" >&2; exit 2; }
for method in $METHODS; do
  [ -n "${ENTRY[$method]:-}" ] || { echo "run_all.sh: unknown method token '$method' (one of: $(printf '%s\n' "${!ENTRY[@]}" | sort | xargs))" >&2; exit 2; }
  [ -f "configs/${method}_${CFG}.yaml" ] || { echo "run_all.sh: no config configs/${method}_${CFG}.yaml for method $method (profile $PROFILE)" >&2; exit 2; }
  if has detection && [[ " $DETECTION_METHODS " == *" $method "* ]] && grep -qE "^\s*arch: vit" "configs/${method}_${CFG}.yaml"; then
    echo "run_all.sh: --detection-methods names $method, a ViT: detection transfer takes a ResNet (the paper's rows are RN50)" >&2; exit 2
  fi
done
OUT="$RESULTS/$PROFILE"
mkdir -p "$OUT"
FAILED_ROWS=()  # analysis runs that could not run: reported at the end
# variant_run TOKEN VARIANT SEED MODULE ARGS...: pretrain a variant (ARGS: its configs) and probe it
variant_run() {
  local method="$1" variant="$2" seed="$3" entry="$4"; shift 4
  local run_dir="$RUNS/$PROFILE/${method}_${variant}_s${seed}" stem="$OUT/${method}_${variant}_s${seed}"
  echo "=== analysis: $method $variant seed $seed ($PROFILE) -> $run_dir" >&2
  local rc=0
  "${LAUNCH[@]}" "$entry" "$@" --output-dir "$run_dir" "run.seed=$seed" ${EXTRA[@]+"${EXTRA[@]}"} || rc=$?
  if [ "$rc" -ne 0 ]; then  # e.g. an IoU range the crops cannot reach: the row stays empty, the rest runs
    echo "=== analysis: $method $variant seed $seed could not run (exit status $rc, its error is above)" >&2
    FAILED_ROWS+=("$method $variant seed $seed (exit status $rc)")
    return 0
  fi
  probe "$method" "$variant" "$seed"
  training_summary "$method" "$variant" "$seed"
}
# probe TOKEN VARIANT SEED: Table 1's linear probe of a run, unless done
probe() {
  local run_dir="$RUNS/$PROFILE/${1}_${2}_s${3}" stem="$OUT/${1}_${2}_s${3}"
  if stale "${stem}_linear.json" "$run_dir/checkpoint.pth"; then
    echo "=== linear probe: $1 $2 seed $3" >&2
    timed "$1 $2 s$3: linear probe" "${LIN_LAUNCH[@]}" eval.linear --checkpoint "$run_dir/checkpoint.pth" \
      ${LIN[@]+"${LIN[@]}"} ${T1[@]+"${T1[@]}"} "run.seed=$3" --output-dir "$run_dir/eval/linear" \
      --output "${stem}_linear.json"
  fi
}
# the end of a run's training log (loss, collapse measure) as <stem>_train.json
training_summary() {
  local run_dir="$RUNS/$PROFILE/${1}_${2}_s${3}" stem="$OUT/${1}_${2}_s${3}"
  if stale "${stem}_train.json" "$run_dir/checkpoint.pth"; then
    python -m analysis.collapse --run "$run_dir" --output "${stem}_train.json"
  fi
}
# analyse_run RUN BASELINE_RUN DEST scores|none: IoU of the selected views against the baseline's, and
# fANOVA of the pair metrics where the log has scores
analyse_run() {
  local run_dir="$1" base_dir="$2" dest="$3" scores="$4"
  mkdir -p "$dest"
  if stale "$dest/iou.json" "$run_dir/checkpoint.pth"; then
    timed "$(basename "$run_dir"): IoU analysis" python -m analysis.iou --run "$run_dir" --baseline "$base_dir" --output "$dest"
  fi
  if [ "$scores" = scores ] && stale "$dest/importance.json" "$run_dir/checkpoint.pth"; then
    timed "$(basename "$run_dir"): fANOVA and its null" python -m analysis.importance --run "$run_dir" --output "$dest" \
      ${SELECTION_ARGS[@]+"${SELECTION_ARGS[@]}"}
  fi
}
for method in $METHODS; do
  config="configs/${method}_${CFG}.yaml"
  for seed in $SEEDS; do
    for variant in baseline hvs; do
      hvs=false; [ "$variant" = hvs ] && hvs=true
      run_dir="$RUNS/$PROFILE/${method}_${variant}_s${seed}"
      ckpt="$run_dir/checkpoint.pth"
      stem="$OUT/${method}_${variant}_s${seed}"
      echo "=== $method $variant seed $seed ($PROFILE) -> $run_dir" >&2
      timed "$method $variant s$seed: pretraining" "${LAUNCH[@]}" "${ENTRY[$method]}" --config "$config" \
        --output-dir "$run_dir" "run.seed=$seed" "hvs.enabled=$hvs" ${EXTRA[@]+"${EXTRA[@]}"}
      if has knn && stale "${stem}_knn.json" "$ckpt"; then
        timed "$method $variant s$seed: k-NN" python -m eval.knn --checkpoint "$ckpt" ${KNN[@]+"${KNN[@]}"} \
          --output "${stem}_knn.json"
      fi
      if has linear; then probe "$method" "$variant" "$seed"; fi
      if has transfer && [[ " $TRANSFER_METHODS " == *" $method "* ]]; then
        for dataset in $TRANSFER; do
          if stale "${stem}_linear-$dataset.json" "$ckpt"; then
            echo "=== transfer, linear probe: $method $variant seed $seed -> $dataset" >&2
            "${LIN_LAUNCH[@]}" eval.linear --checkpoint "$ckpt" --dataset "$dataset" ${LIN[@]+"${LIN[@]}"} \
              ${TR[@]+"${TR[@]}"} "run.seed=$seed" --output-dir "$run_dir/eval/linear_$dataset" \
              --output "${stem}_linear-$dataset.json"
          fi
          if stale "${stem}_finetune-$dataset.json" "$ckpt"; then
            echo "=== transfer, finetuning: $method $variant seed $seed -> $dataset" >&2
            "${LAUNCH[@]}" eval.finetune --checkpoint "$ckpt" --dataset "$dataset" ${FT[@]+"${FT[@]}"} \
              ${TR[@]+"${TR[@]}"} "run.seed=$seed" --output-dir "$run_dir/eval/finetune_$dataset" \
              --output "${stem}_finetune-$dataset.json"
          fi
        done
      fi
      if has detection && [[ " $DETECTION_METHODS " == *" $method "* ]]; then
        for pair in "${DETECTION[@]}"; do
          dataset="${pair%%:*}"; det_cfg="detection/configs/${pair#*:}.yaml"; det_dir="$run_dir/detection_$dataset"
          if stale "${stem}_detection-$dataset.json" "$ckpt"; then
            echo "=== detection: $method $variant seed $seed -> $dataset ($det_cfg)" >&2
            # a detection run of an older pretraining checkpoint starts over; an interrupted one resumes
            if [ -f "$det_dir/backbone.pkl" ] && [ "$ckpt" -nt "$det_dir/backbone.pkl" ]; then rm -rf "$det_dir"; fi
            python -m detection.train_net --config-file "$det_cfg" --checkpoint "$ckpt" --data-dir "$DATA_DIR" \
              --num-gpus "$(( GPUS > 0 ? GPUS : 1 ))" ${DETECTION_LAUNCH:-} --resume \
              --output "${stem}_detection-$dataset.json" SEED "$seed" OUTPUT_DIR "$det_dir"
          fi
        done
      fi
    done
    # attention maps of the ViT methods: HVS above the baseline, the same test images
    if has attention && grep -qE "^\s*arch: vit" "$config"; then
      png="$OUT/${method}_s${seed}_attention.png"
      hvs_ckpt="$RUNS/$PROFILE/${method}_hvs_s${seed}/checkpoint.pth"
      base_ckpt="$RUNS/$PROFILE/${method}_baseline_s${seed}/checkpoint.pth"
      if stale "$png" "$hvs_ckpt" || [ "$base_ckpt" -nt "$png" ]; then
        python -m eval.attention --checkpoints "$hvs_ckpt" "$base_ckpt" --labels "$method + HVS" "$method" \
          --n-images 4 --output "$png"
      fi
    fi
  done
done

# ----------------------------------------------------------------------------
# Section 5 (--evals analysis): the analyses of the selection logs, then the runs of the experiments
# that change how views are made, each probed linearly as Table 1
# ----------------------------------------------------------------------------
if has analysis || has selection; then
  for method in $METHODS; do
    entry="${ENTRY[$method]}"; config="configs/${method}_${CFG}.yaml"
    hvs_runs=()
    for seed in $SEEDS; do
      base_dir="$RUNS/$PROFILE/${method}_baseline_s${seed}"
      hvs_runs+=("$RUNS/$PROFILE/${method}_hvs_s${seed}")
      analyse_run "${hvs_runs[-1]}" "$base_dir" "$OUT/analysis/${method}_hvs_s${seed}" scores
      has analysis || continue  # selection: the analyses of the logs only, no experiment runs
      for variant in baseline hvs; do  # the rows the experiments stand beside
        training_summary "$method" "$variant" "$seed"
        if [ "$method" = simsiam ] || [ "$method" = dino ]; then probe "$method" "$variant" "$seed"; fi
      done
      if [ "$method" = simsiam ]; then  # Appendix F.2 (easy), Fig. 7 (N = 8), Fig. 4 right (static colour)
        for variant in easy n_views_8 static_color; do
          variant_run "$method" "$variant" "$seed" "$entry" --config "$config" --config "configs/analysis/$variant.yaml"
        done
        analyse_run "$RUNS/$PROFILE/${method}_static_color_s${seed}" "$base_dir" \
          "$OUT/analysis/${method}_static_color_s${seed}" none
      fi
      if [ "$method" = simsiam ] || [ "$method" = dino ]; then  # Table 5
        for policy in $IOU_POLICIES; do
          variant_run "$method" "$policy" "$seed" "$entry" --config "$config" --config "configs/analysis/$policy.yaml"
        done
      fi
      if [ "$method" = dino ]; then  # Table 6; its baseline: DINO ViT-tiny on CIFAR-10 with random crops
        if [ "$STN_CFG" = "$CFG" ]; then  # the same run as DINO's baseline
          cp "$OUT/dino_baseline_s${seed}_linear.json" "$OUT/dino_stn-baseline_s${seed}_linear.json"
        else
          variant_run dino stn-baseline "$seed" dino.main --config "configs/dino_${STN_CFG}.yaml"
        fi
        for mode in $STN_MODES; do
          variant_run dino "stn-$mode" "$seed" stn.main --config "configs/dino_stn_${STN_CFG}.yaml" "stn.mode=$mode"
        done
      fi
    done
    dest="$OUT/analysis/${method}_hvs"
    if stale "$dest/predict.json" "${hvs_runs[-1]}/checkpoint.pth"; then
      mkdir -p "$dest"
      timed "${method}_hvs: predictability" python -m analysis.predict --run "${hvs_runs[@]}" --output "$dest" \
        ${PREDICT_ARGS[@]+"${PREDICT_ARGS[@]}"}
    fi
  done
fi

python -m eval.summary --results "$OUT" --scale "$SCALE (seeds: $SEEDS)" --paper-epochs "$PAPER_EPOCHS" > /dev/null
cp "$OUT/summary.md" "$RESULTS/summary.md"
echo "wrote $RESULTS/summary.md" >&2
cat "$RESULTS/summary.md"
if [ "${#FAILED_ROWS[@]}" -gt 0 ]; then
  printf 'run_all.sh: these analysis runs could not run, their rows are empty:\n' >&2
  printf '  %s\n' "${FAILED_ROWS[@]}" >&2
  exit 1
fi
