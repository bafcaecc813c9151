#!/usr/bin/env bash
# One GPU check of the real training and inference paths with the GPU configs (base.yaml of both
# stages: CUDA, 16-mixed), plus throughput and one full-size study end to end.
#
# Usage (repo root, on a CUDA machine whose Python has torch + pytorch-lightning):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   DRY=1 bash benchmarks/gpu_check.sh /tmp/out   # CPU dry run of the same code paths (tiny)
# Missing pure-Python dependencies can travel as wheels in .whl/ (installed to /tmp/site).
set -euo pipefail
OUT=${1:-${OUT:-/tmp/gpu_out}}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -z "${DRY:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
T=${T:-/tmp/gpucheck}; rm -rf "$T"; mkdir -p "$T"
# Without wandb installed (the GPU image has none) the configs' WandbLogger cannot even be
# parsed: use copies of the base configs without a logger.
S1BASE=configs/stage1/base.yaml; S2BASE=configs/stage2/base.yaml
if [ -n "${NO_WANDB:-}" ] || ! $PY -c "import wandb" 2>/dev/null; then
  for s in 1 2; do
    $PY -c "import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); c['trainer'].pop('logger', None); yaml.safe_dump(c, open(sys.argv[2], 'w'))" \
      configs/stage$s/base.yaml "$T/stage${s}_base.yaml"
  done
  S1BASE=$T/stage1_base.yaml; S2BASE=$T/stage2_base.yaml
fi
if [ -n "${DRY:-}" ]; then
  DEV=(--trainer.accelerator cpu --trainer.precision 32-true --trainer.limit_train_batches 1
       --trainer.limit_val_batches 1 --data.num_workers 0)
  printf 'data:\n  grid_shape: [32, 32, 32]\n' > "$T/dry_stage1.yaml"
  S1=(-c "$S1BASE" -c "$T/dry_stage1.yaml"); DEVICE=cpu; JOBS=2; E1=1; E2=1
else
  DEV=(); S1=(-c "$S1BASE"); DEVICE=cuda; JOBS=8; E1=2; E2=3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
S=$(date +%s)
$PY -m cspine synth "$T/tiny" --preset tiny
$PY -m cspine synth "$T/full" --preset full --n-train 1 --n-test 0 > "$T/full.log" 2>&1 &
SYNTH_PID=$!
$PY -m cspine folds "$T/tiny" --out "$T/w/folds.csv"
$PY -m stage1_segment.prepare "${S1[@]}" \
  --data-root "$T/tiny" --work-dir "$T/w" --jobs $JOBS 2>&1 | tail -2
echo "== stage 1 fit (base.yaml), $E1 epochs"
t0=$(date +%s)
$PY -m stage1_segment fit "${S1[@]}" --data.data_root "$T/tiny" --data.work_dir "$T/w" \
  --trainer.logger false --trainer.max_epochs $E1 --trainer.check_val_every_n_epoch 1 \
  "${DEV[@]}" 2>&1 | tail -4
echo "stage 1 fit wall: $(( $(date +%s) - t0 )) s"
$PY -m cspine crops "$T/tiny" --work "$T/w" "${S1[@]}" --stage1-ckpt last \
  --device $DEVICE --jobs $JOBS 2>&1 | tail -1
echo "== stage 2 fit (base.yaml), fold 0, $E2 epochs"
t0=$(date +%s)
$PY -m stage2_classify fit -c "$S2BASE" --data.fold 0 \
  --data.manifest "$T/w/stage1/crops/vertebrae.csv" --data.data_root "$T/tiny" \
  --data.folds_csv "$T/w/folds.csv" --trainer.default_root_dir "$T/w/stage2/fold0" \
  --trainer.logger false --trainer.max_epochs $E2 --oof_dir "$T/w/stage2/oof" "${DEV[@]}" 2>&1 | tail -4
echo "stage 2 fit wall: $(( $(date +%s) - t0 )) s"
wait $SYNTH_PID || { cat "$T/full.log"; exit 1; }
STUDY=$(ls -d "$T"/full/train_images/*/ | head -1)
$PY benchmarks/gpu_throughput.py --device $DEVICE --stage1-ckpt "$T/w/stage1/checkpoints/last.ckpt" \
  --stage2-ckpt "$T/w/stage2/fold0/checkpoints/last.ckpt" --study "$STUDY" | tee "$OUT/gpu_throughput.md"
echo "== the engine on a full-size study (warm per study, batch throughput, GPU utilisation)"
if [ -n "${DRY:-}" ]; then
  $PY benchmarks/predict_full.py --dry-run | tee "$OUT/predict_full.md"
else
  $PY benchmarks/predict_full.py --device cuda --batch 40 --jobs 14 | tee "$OUT/predict_full.md"
fi
echo "total wall: $(( $(date +%s) - S )) s"
