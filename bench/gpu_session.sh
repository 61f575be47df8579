#!/usr/bin/env bash
# The last call of a GPU-machine session for bench/gpu.py (see the developers' guide and its device tool):
# the machine has no network, so what it lacks travels in the call's carried folders, each ignored by git:
#   .ort/   onnxruntime-gpu 1.31.1 (CUDA 13) as one tar.xz in parts (ort.tar.xz.aa, .ab, ...); parts that did not
#           fit this call were copied to /tmp/chunks/ by earlier back-to-back calls (`cp .ort/* /tmp/chunks/`)
#   .whl/   diffusers (pure Python)     .whl2/ onnxruntime-ep-webgpu     .gl/ Vulkan loader debs
#   .cfg/   the SD 1.5 reference configs (../shared/reference-configs/sd15)
# Usage there: bash bench/gpu_session.sh PHASES SHA256_OF_THE_TAR_XZ
set -euo pipefail
phases=$1 sha=$2
for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done  # Vulkan, for the WebGPU phases only
ldconfig
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -f "$nvidia_icd" ]; then export VK_DRIVER_FILES=$nvidia_icd; fi

mkdir -p /tmp/chunks /tmp/site /tmp/edgesd
cp .ort/* /tmp/chunks/ 2>/dev/null || true
cat /tmp/chunks/ort.tar.xz.* > /tmp/ort.tar.xz
echo "$sha  /tmp/ort.tar.xz" | sha256sum -c --quiet
tar -xJf /tmp/ort.tar.xz -C /tmp/site  # onnxruntime (GPU build) ahead of the machine's CPU one on PYTHONPATH
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $(ls .whl/*.whl .whl2/*.whl 2>/dev/null)
rm -rf /tmp/edgesd  # a warm machine's earlier install: pip --target would keep it
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/edgesd .
export PYTHONPATH=/tmp/edgesd:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The CUDA EP loads CUDA 13 and cuDNN 9 from the machine's torch wheels (nvidia/*/lib).
torch_nvidia=$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia'))")
LD_LIBRARY_PATH=$(find "$torch_nvidia" -type d -name lib | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
python3 bench/gpu.py --work /tmp/work --configs .cfg/sd15 --out "$OUT" --phases "$phases"
