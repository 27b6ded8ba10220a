#!/usr/bin/env bash
# The SWI segmenter trained on a GPU, on the benchmark's training cohort, in four settings side by
# side (one process each, sharing the GPU, same data, same seed, same validation subjects):
#   cpucfg  config/benchmark.yaml's segmenter (widths 8..64, 160 epochs of 128 crops): what
#           `make benchmark` trains on the 2-core CPU, here on the GPU;
#   gpucfg  config/benchmark-gpu.yaml's segmenter (widths 16..128, 200 epochs of 256 crops, batch 8);
#   gpuctx  gpucfg with 128 x 128 x 32 crops (8 times the voxels per crop; 32 crops of batch 4 per
#           epoch, so that an epoch sees as many voxels as gpucfg's);
#   gpulong gpucfg for 400 epochs, the whole-volume check every 20 (as many checks).
# Each arm's model folder (model.pt, card.json, train_log.csv) and log come back as $OUT/<arm>.tar.
#
# Made for the device tool's machine (its own torch; monai and nibabel carried as wheels in .whl;
# the cohort packed by benchmarks/pack_cohort.py into .gpudata, 8-bit, under the 64 MiB limit):
#   PYTHONPATH=workflow .venv/bin/python benchmarks/pack_cohort.py <bench results> .gpudata --cohorts bench-train --bits 8
#   device run, carry [.whl, .gpudata]: bash benchmarks/device_segmenter.sh
# Test Dice of the returned models is measured on the CPU, on the full-precision images, by
# benchmarks/bench_segmenter_tta.py --model <arm folder> --cohorts bench-test bench-external.
set -u
OUT=${OUT:-/tmp/device_out}
ARM_LIMIT=${ARM_LIMIT:-470}
mkdir -p "$OUT" /tmp/seg_models
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:workflow PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, monai, nibabel; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"

run_arm() {
  local name=$1; shift
  local dir=/tmp/seg_models/$name
  mkdir -p "$dir"
  { date -u +%FT%T; echo "arm $name: $*"; } > "$dir/run.log"
  timeout "$ARM_LIMIT" python3 benchmarks/ablate_segmenter.py none "$dir" --results .gpudata \
      --device cuda --threads 4 "$@" >> "$dir/run.log" 2>&1
  echo "exit $? at $(date -u +%FT%T)" >> "$dir/run.log"
  rm -f "$dir/checkpoint.pt"
  tar -C /tmp/seg_models -cf "$OUT/$name.tar" "$name"
}
run_arm cpucfg &
run_arm gpucfg --config config/benchmark-gpu.yaml &
run_arm gpuctx --config config/benchmark-gpu.yaml --set "crop=[128, 128, 32]" batch_size=4 crops_per_epoch=32 &
run_arm gpulong --config config/benchmark-gpu.yaml --set epochs=400 volume_validation_every=20 &
wait
for f in /tmp/seg_models/*/run.log; do echo "== $f"; tail -3 "$f"; done
