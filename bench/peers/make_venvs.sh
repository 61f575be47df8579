#!/usr/bin/env bash
# Creates one venv per peer under bench/venvs (gitignored), with pinned versions. Idempotent: a finished venv
# is kept, a half-made one is made again. Usage: bash bench/peers/make_venvs.sh [diffusers|optimum-onnx|optimum-intel|openvino-genai|sdcpp ...]
# torch is pinned through constraints.txt in every install: anything newer pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
C="-c constraints.txt"

make_venv() {  # name, then pip arguments; a venv counts as made once its .complete marker exists
  local name=$1; shift
  local venv=bench/venvs/$name
  if [ -f "$venv/.complete" ]; then echo "kept $venv"; return; fi
  echo "creating $venv"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q $C "$@"
  touch "$venv/.complete"
}

want() { [ $# -eq 0 ] || [[ " $* " == *" $NAME "* ]]; }
ALL=("$@")

NAME=diffusers; if want "${ALL[@]}"; then
  make_venv diffusers torch==2.13.0 diffusers==0.42.1 transformers==5.23.0 accelerate==1.15.0 \
      safetensors==0.8.0 pillow==13.0.0 numpy==2.4.6
fi
NAME=optimum-onnx; if want "${ALL[@]}"; then
  make_venv optimum-onnx torch==2.13.0 "optimum-onnx[onnxruntime]==0.1.0" transformers==4.57.6 \
      diffusers==0.35.2 click pillow safetensors accelerate
  # the fixtures script builds the micro model with edgesd's own code from this venv
  bench/venvs/optimum-onnx/bin/pip install -q $C --no-deps -e .
fi
NAME=optimum-intel; if want "${ALL[@]}"; then
  make_venv optimum-intel torch==2.13.0 "optimum-intel[openvino,diffusers]==2.2.0" diffusers==0.35.2 \
      transformers==4.57.6 click pillow safetensors accelerate
  # optimum-intel pulls a CUDA torchvision that breaks its export; nothing here needs torchvision.
  bench/venvs/optimum-intel/bin/pip uninstall -y -q torchvision
fi
NAME=openvino-genai; if want "${ALL[@]}"; then
  make_venv openvino-genai openvino==2026.4.1 openvino-genai==2026.4.1.0 openvino-tokenizers==2026.4.1.0 \
      numpy==2.4.6 pillow==13.0.0
fi
NAME=sdcpp; if want "${ALL[@]}"; then
  # sdist only: pip compiles stable-diffusion.cpp (ggml, CPU) on this machine, as a user's pip would. ggml's
  # default is GGML_NATIVE (-march=native: AVX2/FMA, AVX-512 where the CPU has them); said here explicitly, and
  # the build's flags are kept in bench/peers/versions/sdcpp-build.txt.
  CMAKE_ARGS=${CMAKE_ARGS:--DGGML_NATIVE=ON} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
      make_venv sdcpp stable-diffusion-cpp-python==0.4.7 pillow==13.0.0 numpy==2.4.6
fi
if [ -d bench/venvs/sdcpp ] && want "${ALL[@]}"; then  # which instruction sets the built library uses
  lib=$(find bench/venvs/sdcpp -name 'libggml-cpu*.so' -o -name 'libstable-diffusion*.so' | head -1)
  { echo "CMAKE_ARGS=${CMAKE_ARGS:--DGGML_NATIVE=ON}"; echo "library: ${lib#bench/venvs/sdcpp/}";
    echo "zmm (AVX-512) instructions: $(objdump -d "$lib" 2>/dev/null | grep -c zmm || true)";
    echo "ymm (AVX/AVX2) instructions: $(objdump -d "$lib" 2>/dev/null | grep -c ymm || true)"; } \
      > bench/peers/versions/sdcpp-build.txt
fi
for v in bench/venvs/*/; do
  [ -x "$v/bin/python" ] && "$v/bin/pip" freeze > "bench/peers/versions/$(basename "$v").txt" 2>/dev/null || true
done
