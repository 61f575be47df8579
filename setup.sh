#!/usr/bin/env bash
# Sets up edgesd for development on a fresh machine: a venv in .venv with the runtime,
# the exporter and the test tools, torch pinned by constraints.txt to the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q -c constraints.txt -e '.[export,dev]'
