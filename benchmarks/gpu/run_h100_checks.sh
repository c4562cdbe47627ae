#!/usr/bin/env bash
# The GPU check of calm-fast, as one script for a lent GPU machine whose python3 already has torch,
# triton, numba, OpenCV, rich and matplotlib but not DeepSpeed (and not FFCV, which this check does not use).
# DeepSpeed and its missing dependencies travel as wheels in .whl/, made beforehand on a machine with pip:
#   pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       pydantic pydantic-core annotated-types typing-inspection hjson   (versions as pip resolves them here)
# Writes every log and result under $OUT (default: runs/gpu-check). Parts run one after the other, each
# with its own time limit (HEAD_LIMIT, PROFILE_LIMIT, E2E_LIMIT seconds; 0 skips the first two), so one
# that fails or overruns leaves the others' results.
#   1. calm-fast bench head: the fused Triton head checked against the PyTorch oracle on the device
#      (values, gradients, EM loss, edge cases), then timed against plain PyTorch and torch.compile.
#      benchmarks/gpu/profile_head.py then splits its time into host and per-kernel device time.
#   2. End to end on one GPU: synth -> calm-fast train (DeepSpeed, bf16, torch loader) -> calm-fast eval.
set -u
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The package as it installs (kernels/ becomes calm_fast.kernels), without pip or a build.
PKG=/tmp/calm_fast_pkg
rm -rf "$PKG" && mkdir -p "$PKG" && cp -r calm_fast "$PKG/" && rm -rf "$PKG/calm_fast/kernels" && cp -r kernels "$PKG/calm_fast/kernels"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1
fi
export PYTHONPATH="$PKG:/tmp/site"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__)"
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1; } > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

if [ "${HEAD_LIMIT:-300}" != 0 ]; then
  timeout "${HEAD_LIMIT:-300}" python3 -P -m calm_fast.cli bench head --out "$OUT/head.json" > "$OUT/head.log" 2>&1
  echo "bench head: exit $?" | tee -a "$OUT/status.txt"; tail -40 "$OUT/head.log"
fi
if [ "${PROFILE_LIMIT:-120}" != 0 ]; then
  timeout "${PROFILE_LIMIT:-120}" python3 -P benchmarks/gpu/profile_head.py > "$OUT/profile_head.txt" 2>&1
  echo "profile head: exit $?" | tee -a "$OUT/status.txt"; cat "$OUT/profile_head.txt"
fi

WORK=/tmp/calm_fast_e2e
timeout "${E2E_LIMIT:-240}" bash -c "
  python3 -P -m calm_fast.cli synth --out $WORK/data --sizes train=2000,val=200,test=500 --workers 12 --overwrite &&
  python3 -P -m calm_fast.cli train -c configs/synthetic.toml data.root=$WORK/data run_dir=$WORK/run data.loader=torch \
      data.workers=8 train.max_steps=1500 train.progress=false train.tensorboard=false train.checkpoint_every=200 &&
  python3 -P -m calm_fast.cli eval --run $WORK/run --out $WORK/eval data.loader=torch data.workers=8
" > "$OUT/e2e.log" 2>&1
echo "end to end: exit $?" | tee -a "$OUT/status.txt"; tail -30 "$OUT/e2e.log"
cp "$WORK/run/summary.json" "$OUT/e2e-train-summary.json" 2>/dev/null
cp "$WORK/eval/results.json" "$OUT/e2e-eval-results.json" 2>/dev/null
exit 0
