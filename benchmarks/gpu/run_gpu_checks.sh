#!/usr/bin/env bash
# Every GPU check and benchmark of calm-fast, as one script for a lent GPU machine (run from the repository
# root): its python3 has torch, triton, numba, OpenCV, rich and matplotlib, but not DeepSpeed or FFCV. Those
# travel as wheels in .whl/, made beforehand on a machine with pip and the lent machine's Python version:
#   pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       pydantic pydantic-core annotated-types typing-inspection hjson   (versions as pip resolves them here)
#   pip wheel --no-deps ffcv==1.0.2 -w .whl        (built against OpenCV and libturbojpeg; their shared
#       libraries, if the lent machine lacks them, go into .whl/lib, which is put on LD_LIBRARY_PATH)
# and carried with the working tree. Each part writes JSON and a log under $OUT (default runs/gpu-check) and
# runs under its own time limit (seconds; 0 skips the part), so one that fails or overruns leaves the others':
#   1. HEAD_LIMIT (600)   calm-fast bench head: on-device checks of the fused loss op (values and gradients vs
#      the oracle, determinism, no host sync, <= 2 kernels per direction, CUDA graph capture, torch.compile
#      fullgraph with Inductor, every opcheck test), then fwd+bwd timing of the paper's shapes in both
#      layouts: fused, fused merged, fused under CUDA graphs, the naive oracle, compile and compile
#      reduce-overhead; host, device and wall time apart.                                -> head.json
#   2. TRAIN_LIMIT (420)  calm-fast bench train --compare heads: images/s of a full training step, ResNet50
#      at 224 px (28x28 maps) and tiny_resnet, bf16, CAM head vs CALM-EM fused / eager / compiled, with
#      peak memory.                                                                     -> train-heads.json
#   3. E2E_LIMIT (600)    calm-fast synth -> convert (FFCV .beton) -> train (ResNet50, 224 px, bf16, fused
#      head, FFCV loader; a torch-loader run, labelled so, if FFCV does not import) -> eval; images/s from
#      the run's summary.                                          -> e2e-train-summary.json, e2e-eval.json
# $OUT/summary.json collects every part's exit status and headline numbers.
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
[ -d .whl/lib ] && export LD_LIBRARY_PATH="$PWD/.whl/lib:${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$PKG:/tmp/site"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__)"
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
  python3 -c "import ffcv; print('ffcv', ffcv.__version__)" 2>&1 | tail -1; } > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
: > "$OUT/status.txt"

run_part() {  # name limit command...: runs the command under its limit, logs to $OUT/name.log, records the exit
  local name=$1 limit=$2; shift 2
  if [ "$limit" = 0 ]; then echo "$name: skipped" | tee -a "$OUT/status.txt"; return; fi
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?" | tee -a "$OUT/status.txt"; tail -40 "$OUT/$name.log"
}

run_part head "${HEAD_LIMIT:-600}" python3 -P -m calm_fast.cli bench head --repeats 3 --rep 10 --out "$OUT/head.json"
run_part train-heads "${TRAIN_LIMIT:-420}" python3 -P -m calm_fast.cli bench train --compare heads --steps 10 \
    --out "$OUT/train-heads.json"

WORK=/tmp/calm_fast_e2e
LOADER=ffcv
python3 -c "import ffcv" > /dev/null 2>&1 || { LOADER=torch; echo "e2e: FFCV does not import; torch loader instead" | tee -a "$OUT/status.txt"; }
echo "$LOADER" > "$OUT/e2e-loader.txt"
run_part e2e "${E2E_LIMIT:-600}" bash -c "
  set -e
  python3 -P -m calm_fast.cli synth --out $WORK/data --sizes train=4000,val=200,test=500 --workers 12 --overwrite
  if [ $LOADER = ffcv ]; then python3 -P -m calm_fast.cli convert --data-root $WORK/data --workers 12 --force; fi
  python3 -P -m calm_fast.cli train -c configs/synthetic.toml data.root=$WORK/data run_dir=$WORK/run \
      data.loader=$LOADER data.workers=12 model.backbone=resnet50 data.input_size=224 data.resize_size=256 \
      data.batch_size=64 train.precision=bf16 train.max_steps=400 train.val_every=0 train.progress=false \
      train.tensorboard=false train.checkpoint_every=0
  python3 -P -m calm_fast.cli eval --run $WORK/run --out $WORK/eval data.loader=$LOADER data.workers=12"
cp "$WORK/run/summary.json" "$OUT/e2e-train-summary.json" 2>/dev/null
cp "$WORK/eval/results.json" "$OUT/e2e-eval.json" 2>/dev/null

python3 - "$OUT" <<'EOF' || true
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None
summary = {"status": (out / "status.txt").read_text().splitlines(),
           "environment": (out / "environment.txt").read_text().splitlines()}
head = load("head.json")
if head:
    summary["head_checks_passed"] = all(check["passed"] for check in head["correctness"])
    summary["head"] = [{key: row[key] for key in ("shape", "layout", "path", "wall_ms", "host_ms", "device_ms",
                                                  "fraction_of_peak", "speedup_vs_oracle", "speedup_vs_compile",
                                                  "speedup_vs_compile_ro", "peak_extra_in_logits")}
                       for row in head["benchmarks"]]
train = load("train-heads.json")
if train:
    summary["train_heads"] = [{key: row[key] for key in ("backbone", "variant", "images_per_s", "vs_cam",
                                                         "peak_memory_bytes")} for row in train["results"]]
e2e = load("e2e-train-summary.json")
if e2e:
    summary["e2e"] = {"loader": (out / "e2e-loader.txt").read_text().strip(),
                      **{key: e2e.get(key) for key in ("images_per_s_median", "steps", "precision", "loader")}}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2)[:4000])
EOF
exit 0
