"""Run a benchmark script's configurations each in a fresh process, in alternating rounds (this shared machine
drifts by 10-20% over minutes: alternating keeps a drift from landing on one configuration)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def alternating(script: str | Path, configs: list[str], rounds: int, args: list[str]) -> list[dict]:
    """For each round, each config: `python script *args --phase CONFIG`, whose last stdout line is a JSON
    object; returns those objects with their round."""
    rows = []
    for round_ in range(1, rounds + 1):
        for config in configs:
            done = subprocess.run([sys.executable, str(script), *args, "--phase", config], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-2000:])
            rows.append({"round": round_, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    return rows
