#!/usr/bin/env bash
# `gtrain bench` over the GPU matrix of the benchmark issue, in one go:
#   resnext29_8x64d and hornet_cifar_tiny_7x7 at 32 px (batch 256),
#   resnext50_32x4d and hornet_tiny_7x7 at 224 px (batch 128),
#   eager: fp32 and bf16 x NCHW and channels_last (16 runs), then
#   three short `gtrain fit` runs with the defaults: the quickstart (in-memory data on the
#   GPU), resnext50_32x4d on FakeData at 224 px (the DataLoader path, 8 workers) and on
#   a folder of JPEGs (the uint8 ImageFolder path), for images/s and the share of time
#   spent waiting for data, and `gtrain bench --data` on the JPEG recipe; then
#   compiled: bf16 + channels_last, the setup one would train with (4 runs).
# torch.compile takes a minute or more per model (training and inference graphs), so
# the compiled runs come last and cover only the setup that matters.
#
# Each result is one JSON line appended to ${OUT:-.}/gpu_bench.jsonl; stderr of every
# run goes to gpu_bench.log. Every run has its own timeout and the whole matrix a
# budget (BUDGET_S, default 540 s): a hang or a slow compile costs at most its own
# timeout, and runs that would start past the budget are skipped and listed.
#
#   bash benchmarks/gpu.sh                      # from the repository root, after pip install -e .
#   STEPS=10 BUDGET_S=300 bash benchmarks/gpu.sh
#
# A dry run of the whole script on a CPU, to check it before GPU time is spent on it (its
# numbers mean nothing; bf16 is emulated on most CPUs and slow, so skip it there):
#   DEVICE=cpu PRECISIONS=fp32 BATCH_SMALL=2 BATCH_LARGE=2 SIZE_LARGE=32 FIT_BATCH=256 STEPS=1 \
#     REPEATS=1 FIT_EPOCHS=1 COMPILED_TIMEOUT_S=5 OUT=/tmp/gpu_dry bash benchmarks/gpu.sh
set -euo pipefail

PYTHON=${PYTHON:-python}
OUT_DIR=${OUT:-.}
STEPS=${STEPS:-20}
REPEATS=${REPEATS:-3}
BUDGET_S=${BUDGET_S:-540}
EAGER_TIMEOUT_S=${EAGER_TIMEOUT_S:-120}
COMPILED_TIMEOUT_S=${COMPILED_TIMEOUT_S:-240}
DEVICE=${DEVICE:-cuda}
BATCH_SMALL=${BATCH_SMALL:-256}   # the 32 px models
BATCH_LARGE=${BATCH_LARGE:-128}   # the 224 px models
SIZE_LARGE=${SIZE_LARGE:-224}
FIT_EPOCHS=${FIT_EPOCHS:-2}
FIT_BATCH=${FIT_BATCH:-$BATCH_LARGE}  # FakeData has 2,560 training images: 20 steps per epoch at 128
PRECISIONS=${PRECISIONS:-bf16 fp32}

mkdir -p "$OUT_DIR"
results="$OUT_DIR/gpu_bench.jsonl"
log="$OUT_DIR/gpu_bench.log"
: >"$log"
touch "$results"

{
  nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,memory.total --format=csv || true
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
} | tee "$OUT_DIR/gpu_env.txt"

# --repeats is passed only where the CLI has it; otherwise run_bench's default applies.
repeat_args=()
if "$PYTHON" -m gtrain bench --help 2>/dev/null | grep -q -- "--repeats"; then
  repeat_args=(--repeats "$REPEATS")
fi

skipped=()
failed=()

# bench MODEL IMAGE_SIZE BATCH PRECISION FORMAT(nchw|cl) MODE(eager|compiled) TIMEOUT_S
bench() {
  local model=$1 size=$2 batch=$3 precision=$4 format=$5 mode=$6 limit_s=$7
  local label="$model ${size}px b$batch $precision $format $mode"
  local left_s=$((BUDGET_S - SECONDS))
  if ((left_s < 30)); then
    skipped+=("$label")
    return 0
  fi
  if ((limit_s > left_s)); then limit_s=$left_s; fi
  local args=("$model" --batch-size "$batch" --image-size "$size" --precision "$precision"
    --device "$DEVICE" --steps "$STEPS" ${repeat_args[@]+"${repeat_args[@]}"} --json)
  if [[ $format == cl ]]; then args+=(--channels-last); else args+=(--no-channels-last); fi
  if [[ $mode == compiled ]]; then args+=(--compile); fi

  echo "== $label (timeout ${limit_s}s, ${SECONDS}s used)" | tee -a "$log"
  local started=$SECONDS output
  if output=$(timeout --kill-after=10 "$limit_s" "$PYTHON" -m gtrain bench "${args[@]}" 2>>"$log"); then
    # The JSON object is the last line of stdout.
    printf '%s\n' "$output" | tail -n 1 | tee -a "$results"
    echo "   $((SECONDS - started))s" >>"$log"
  else
    echo "   FAILED (exit $?) after $((SECONDS - started))s: see $log" | tee -a "$log"
    failed+=("$label")
  fi
}

cifar=(resnext29_8x64d hornet_cifar_tiny_7x7)
imagenet=(resnext50_32x4d hornet_tiny_7x7)

for precision in $PRECISIONS; do
  for format in cl nchw; do
    for model in "${cifar[@]}"; do bench "$model" 32 "$BATCH_SMALL" "$precision" "$format" eager "$EAGER_TIMEOUT_S"; done
    for model in "${imagenet[@]}"; do bench "$model" "$SIZE_LARGE" "$BATCH_LARGE" "$precision" "$format" eager "$EAGER_TIMEOUT_S"; done
  done
done

# fit LABEL TIMEOUT_S ARGS...: one `gtrain fit` run; its last metrics.jsonl row goes to gpu_fit.jsonl.
fits="$OUT_DIR/gpu_fit.jsonl"
: >"$fits"
fit() {
  local label=$1 limit_s=$2
  shift 2
  local left_s=$((BUDGET_S - SECONDS))
  if ((left_s < 30)); then
    skipped+=("fit $label")
    return 0
  fi
  if ((limit_s > left_s)); then limit_s=$left_s; fi
  local run="$OUT_DIR/fit_$label"
  rm -rf "$run"
  echo "== fit $label (timeout ${limit_s}s, ${SECONDS}s used)" | tee -a "$log"
  if timeout --kill-after=10 "$limit_s" "$PYTHON" -m gtrain fit "$@" --device "$DEVICE" --out "$run" --quiet >>"$log" 2>&1; then
    "$PYTHON" -c 'import json, sys; row = json.loads(open(sys.argv[1]).read().splitlines()[-1]); row["label"] = sys.argv[2]; print(json.dumps(row))' \
      "$run/metrics.jsonl" "$label" | tee -a "$fits"
  else
    echo "   FAILED (exit $?): see $log" | tee -a "$log"
    failed+=("fit $label")
  fi
}

fit quickstart_digits 120 quickstart --set train.epochs="$FIT_EPOCHS"
fit "resnext50_fakedata_$SIZE_LARGE" 240 quickstart --set data.dataset=FakeData --set model.name=resnext50_32x4d \
  --set data.image_size="$SIZE_LARGE" --set data.batch_size="$FIT_BATCH" --set data.workers=8 \
  --set train.epochs="$FIT_EPOCHS" --set optim.warmup_epochs=0

# The ImageFolder path: photograph-like 500x375 JPEGs drawn by benchmarks/loader.py,
# decoded with torchvision.io in 8 workers, uint8 batches finished on the GPU; then
# `gtrain bench --data` on the same recipe: the loader alone against the model's step;
# then both again with data.decode=device (nvJPEG: the workers only read the files).
jpegs="$OUT_DIR/jpegs"
if [[ ! -d $jpegs/train ]]; then
  "$PYTHON" -c 'import sys; sys.path.insert(0, "benchmarks"); from pathlib import Path; import loader; loader.write_jpegs(Path(sys.argv[1]), int(sys.argv[2]))' \
    "$jpegs" "${JPEGS:-1024}"
fi
jpeg_recipe=(quickstart --set data.dataset=ImageFolder --set data.root="$jpegs" --set model.name=resnext50_32x4d
  --set data.image_size="$SIZE_LARGE" --set data.batch_size="$FIT_BATCH" --set data.workers=8)
fit "resnext50_jpegs_$SIZE_LARGE" 240 "${jpeg_recipe[@]}" --set train.epochs="$FIT_EPOCHS" --set optim.warmup_epochs=0
: >"$OUT_DIR/gpu_bench_data.jsonl"
for decode in cpu device; do
  if ((BUDGET_S - SECONDS > 60)); then
    echo "== bench --data resnext50 jpegs decode=$decode (${SECONDS}s used)" | tee -a "$log"
    timeout --kill-after=10 120 "$PYTHON" -m gtrain bench --data "${jpeg_recipe[@]}" --set data.decode="$decode" \
      --device "$DEVICE" --batches 100 --steps "$STEPS" --json 2>>"$log" | tail -n 1 | tee -a "$OUT_DIR/gpu_bench_data.jsonl" \
      || failed+=("bench --data jpegs decode=$decode")
  else
    skipped+=("bench --data jpegs decode=$decode")
  fi
done
fit "resnext50_jpegs_gpu_decode_$SIZE_LARGE" 240 "${jpeg_recipe[@]}" --set data.decode=device --set train.epochs="$FIT_EPOCHS" \
  --set optim.warmup_epochs=0

# The loader alone on the same kind of JPEGs: CPU decode (uint8 batches, finished on the GPU)
# against nvJPEG decode on the GPU, the float path and timm's (if installed), 0 and 8 workers.
if ((BUDGET_S - SECONDS > 90)); then
  echo "== benchmarks/loader.py on $DEVICE (${SECONDS}s used)" | tee -a "$log"
  timeout --kill-after=10 150 "$PYTHON" benchmarks/loader.py --device "$DEVICE" --workers 0 8 --images 1024 --json \
    2>>"$log" | tail -n 1 | tee "$OUT_DIR/gpu_loader.json" || failed+=("benchmarks/loader.py")
else
  skipped+=("benchmarks/loader.py")
fi

# Compiled last: a compile takes a minute or more, and the budget may end first.
# HorNet first: its LayerNorms, gates and GELUs are where fusion can pay.
bench hornet_tiny_7x7 "$SIZE_LARGE" "$BATCH_LARGE" bf16 cl compiled "$COMPILED_TIMEOUT_S"
bench hornet_cifar_tiny_7x7 32 "$BATCH_SMALL" bf16 cl compiled "$COMPILED_TIMEOUT_S"
bench resnext50_32x4d "$SIZE_LARGE" "$BATCH_LARGE" bf16 cl compiled "$COMPILED_TIMEOUT_S"
bench resnext29_8x64d 32 "$BATCH_SMALL" bf16 cl compiled "$COMPILED_TIMEOUT_S"

echo
echo "total ${SECONDS}s; results in $results and $fits"
for label in "${failed[@]+"${failed[@]}"}"; do echo "failed: $label"; done
for label in "${skipped[@]+"${skipped[@]}"}"; do echo "skipped (budget): $label"; done

"$PYTHON" - "$results" "$fits" <<'EOF'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
fits = [json.loads(line) for line in open(sys.argv[2]) if line.strip()]
if rows:
    print(f"\n{rows[0]['device_name']}, torch {rows[0]['torch_version']}")
header = f"{'model':<24}{'px':>4}{'batch':>6}  {'prec':<5}{'format':<7}{'mode':<9}{'train img/s':>12}{'±%':>6}{'infer img/s':>13}{'±%':>6}{'TFLOP/s':>9}{'MFU':>7}"
print(header)
print("-" * len(header))
for r in rows:
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    print(
        f"{r['model']:<24}{r['image_size']:>4}{r['batch_size']:>6}  {r['precision']:<5}"
        f"{'cl' if r['channels_last'] else 'nchw':<7}{'compiled' if r['compiled'] else 'eager':<9}"
        f"{r['train_images_per_s']:>12,.0f}{r['train_spread_pct']:>6.1f}{r['infer_images_per_s']:>13,.0f}"
        f"{r['infer_spread_pct']:>6.1f}{r['tflops']:>9.1f}{mfu:>7}"
    )
if fits:
    print(f"\n{'gtrain fit (defaults)':<26}{'epoch':>6}{'train img/s':>13}{'data wait':>11}{'val top-1':>11}{'s/epoch':>9}")
    for f in fits:
        print(
            f"{f['label']:<26}{f['epoch']:>6}{f['images_per_s']:>13,.0f}{f['data_wait_fraction']:>11.1%}"
            f"{f['val_top1']:>11.2%}{f['seconds']:>9.1f}"
        )
EOF
