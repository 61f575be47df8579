#!/usr/bin/env bash
# Scaling runs (bench/side_by_side.py --threads-sweep) on the workplace's device machine: 16 CPU cores, CPU only,
# python3 3.12 with torch, onnx and onnxruntime but no OpenVINO; nothing can be downloaded there and each call
# carries at most 64 MiB, so the wheels travel in parts (.device/, prepared here by `prepare`).
#
#   bash bench/device_scaling.sh prepare     # here: .device/call1 (wheels but OpenVINO's, the SD 1.5 configs),
#                                            # .device/call2 (OpenVINO, CPU plugin only, as .tar.xz)
#   bash bench/device_scaling.sh call1       # there (carry .device/call1): install, build the SD 1.5 architecture
#                                            # with RANDOM weights, export fp32 ONNX
#   bash bench/device_scaling.sh call2       # there (carry .device/call2): install OpenVINO, the ONNX int8 recipes,
#                                            # sweep the ONNX Runtime configurations (results to $OUT), write the IR
#                                            # int8-hybrid recipe
#   bash bench/device_scaling.sh call3       # there: the IR recipe with the int8 VAE, sweep the OpenVINO
#                                            # configurations; results to $OUT
#   bash bench/device_scaling.sh best        # there, after call1 (carry .device/call2): edgesd's fastest
#                                            # configuration (static int8 IR U-Net + int8 VAE), in f32 and bf16
#   .venv/bin/python bench/side_by_side.py --combine <call2's json> <call3's json> --machine device16 --steps 3
#                                            # here: one results file (each call's tree is fresh: bench/results
#                                            # does not carry over, so the parts are combined here)
# The build lives in ignored folders (bench/work, /tmp/site), kept while the machine stays warm (30 s).
# Not run there: the peers. optimum-intel cannot be installed there (its transformers 4.x beside the image's 5.x,
# over the carry limit), so there is no optimum IR for OpenVINO GenAI, which rejects edgesd's IR (it feeds
# the U-Net an int64 timestep; edgesd's takes float32).
# OpenVINO's wheel (59 MB) is cut to its CPU plugin and the IR/ONNX front ends (22 MB compressed) to fit a call.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/site
PY=python3
THREADS=4,8,16
STEPS=3

pip_target() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"; }
sweep() {  # configurations
  "$PY" bench/side_by_side.py --python "$PY" --machine device16 --threads-sweep $THREADS --steps $STEPS \
      --warm-start "" --configs "$1"
  cp bench/results/device16-* "$OUT"/
}
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$@"
}
install_openvino() {  # side_by_side measures OpenVINO's GEMM peaks too
  [ -d "$SITE/openvino" ] || tar xJf .device/call2/openvino-cpu.tar.xz -C "$SITE"
  "$PY" -c "import openvino as ov, nncf; print('openvino', ov.__version__, ov.Core().available_devices)"
}
export PYTHONPATH=$SITE

case "${1:-}" in
prepare)
  rm -rf .device && mkdir -p .device/call1 .device/call2 .device/ov
  grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo /.device/ >> .git/info/exclude
  for p in diffusers==0.42.1 nncf==3.4.0 openvino-telemetry==2025.2.0 pydot==4.0.1 pyparsing==3.2.5 tabulate==0.9.0 ninja==1.13.0; do
    download .device/call1 "$p"
  done
  cp -r ../shared/reference-configs/sd15 .device/call1/sd15-configs
  download .device/ov openvino==2026.4.1
  (cd .device/ov && unzip -q openvino-*.whl && rm openvino-*.whl \
     && rm -f openvino/libs/libopenvino_intel_{gpu,npu}_plugin.so openvino/libs/cache.json \
              openvino/libs/libopenvino_{tensorflow,tensorflow_lite,paddle,jax,pytorch}_frontend.so* \
     && tar cJf ../call2/openvino-cpu.tar.xz .)
  rm -rf .device/ov
  du -sh .device/call*
  ;;
call1)
  mkdir -p "$SITE"
  pip_target .device/call1/*.whl
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" .
  "$PY" -c "
from pathlib import Path
from edgesd.export.tiny import build_random_sd
from edgesd.export import ExportOptions, export_model
src, out = Path('bench/work/sd15-random'), Path('bench/work/sd15-random-onnx')
if not (src / 'model_index.json').exists():
    build_random_sd(src, seed=0, reference_config=Path('.device/call1/sd15-configs'))
if not (out / 'unet' / 'model.onnx').exists():
    export_model(src, out, ExportOptions(overwrite=True))"
  ;;
call2)
  install_openvino
  "$PY" -c "import sys; sys.path.insert(0, 'bench'); import recipes_backends as r
for recipe in ('int8', 'int8+vae-int8'): r.build('onnxruntime', recipe)"
  sweep edgesd-onnxruntime-int8,edgesd-onnxruntime-int8+vae-int8
  "$PY" -c "import sys; sys.path.insert(0, 'bench'); import recipes_backends as r; r.build('openvino', 'int8-hybrid')"
  ;;
call3)
  "$PY" -c "import sys; sys.path.insert(0, 'bench'); import recipes_backends as r; r.build('openvino', 'int8-hybrid+vae-int8')"
  sweep edgesd-openvino-int8-hybrid,edgesd-openvino-int8-hybrid+vae-int8
  ;;
best)
  install_openvino
  "$PY" -c "import sys; sys.path.insert(0, 'bench'); import recipes_backends as r; r.build('openvino', 'int8+vae-int8')"
  sweep edgesd-openvino-int8+vae-int8,edgesd-openvino-int8+vae-int8-bf16
  ;;
*)
  echo "usage: bash bench/device_scaling.sh prepare | call1 | call2 | call3 | best" >&2; exit 2 ;;
esac
