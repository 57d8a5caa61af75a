#!/usr/bin/env bash
# GPU variant of bench/mfu.py and bench/train_step.py: ViT-B/16 image tower,
# CLIP's 12-layer x 512 text tower (77 tokens), bf16 compute, a batch sweep.
# Run it on an accelerator host, e.g. through the `device` tool:
#   bash bench/gpu_suite.sh            # JSON and logs under $OUT (or /tmp)
# Env: BATCHES (default 64,128,256), PEAK_TFLOPS (datasheet bf16 dense peak
# for the second MFU column; H100 SXM: 989), ROUNDS (default 5).
set -euo pipefail
out="${OUT:-/tmp/hica_gpu_bench}"
batches="${BATCHES:-64,128,256}"
rounds="${ROUNDS:-5}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
  python -c "import jax, torch; print(jax.__version__, jax.devices(), torch.__version__, torch.cuda.is_available())"
} 2>&1 | tee "$out/env.txt"
python bench/mfu.py --preset gpu --batches "$batches" --rounds "$rounds" \
  --nominal_peak_tflops "${PEAK_TFLOPS:-989}" --with_torch \
  --json_out "$out/mfu.json" 2>&1 | tee "$out/mfu.txt"
python bench/train_step.py --preset gpu --batches "$batches" --rounds "$rounds" \
  --systems hica,torch,torch_compile --json_out "$out/train_step.json" \
  2>&1 | tee "$out/train_step.txt"
python bench/profile_step.py --preset gpu --parts compile --compile_archs gpu \
  2>&1 | tee "$out/compile.txt"
