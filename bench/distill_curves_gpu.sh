#!/bin/bash
# The distillation grid's 4,000-query points on one GPU: one bench/distill_curves.py process per
# point, side by side. A point of this size is launch-bound on an H200 (one process keeps the GPU
# well under full use), so six processes share it at 90-99% utilisation and all finish in about
# the time of the slowest (kd, prune:15: 208 s of training; on 2 CPU cores a point takes 2-5 hours).
#
#   WORK=~/.cache/distillguard/bench/distill_curves bash bench/distill_curves_gpu.sh
#   JOBS="15 sft,15 topk-kd" SIZES=4000 bash bench/distill_curves_gpu.sh
#
# WORK must hold the harvest (or a teacher the bench can start: the first step harvests what is
# missing and writes the datasets, then the points train). Each point writes WORK/points/NAME.json,
# marked with the GPU it was trained on; `python bench/distill_curves.py --report-only ...` then
# tables them with the CPU's points. Training is float32 with TF32 products (--tf32); the control
# (top-k KD, prune:11, 4,000 queries) gave 1.847 there against the CPU's 1.859
# (bench/results/distill_curves_gpu.json). Logs: WORK/gpu-logs/.
set -u
WORK=${WORK:-$HOME/.cache/distillguard/bench/distill_curves}
SIZES=${SIZES:-4000}
JOBS=${JOBS:-15 sft,15 topk-kd,15 kd,11 kd,11 topk-kd,11 gkd}
LIMIT=${LIMIT:-0}  # seconds per point (0: none); a point stopped early is not written
LOGS=$WORK/gpu-logs
mkdir -p "$LOGS"
cd "$(dirname "$0")/.."
B=(python bench/distill_curves.py --sizes "$SIZES" --work "$WORK" --threads 2 --save-steps 0 --device cuda --tf32)
# an empty --results merges no committed report into WORK (its points would be skipped as done)
"${B[@]}" --harvest-only --results "$WORK/gpu-results/prep" > "$LOGS/prep.log" 2>&1 \
  || { tail -40 "$LOGS/prep.log"; exit 1; }
IFS=, read -ra jobs <<< "$JOBS"
pids=()
for job in "${jobs[@]}"; do
  read -r depth loss <<< "$job"
  timeout "$LIMIT" "${B[@]}" --depths "$depth" --losses "$loss" --results "$WORK/gpu-results/$depth-$loss" \
    > "$LOGS/$loss-$depth.log" 2>&1 &
  pids+=($!)
done
# GPU use every 30 s (the 90-99% above was read this way)
( while sleep 30; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done ) \
  > "$LOGS/gpu-use.log" 2>&1 &
monitor=$!
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
kill "$monitor"
grep -h "^NLL" "$LOGS"/*.log
exit $status
