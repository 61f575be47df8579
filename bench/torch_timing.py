"""Time PyTorch modules inside a pipeline run (diffusers' side of the benchmarks): forward hooks that add each
call's wall time to a per-name total."""

from __future__ import annotations

import time


class ModuleTimer:
    """`timer.watch(module, "unet")`; after the run, `timer.seconds["unet"]` and `timer.calls["unet"]`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def watch(self, module, name: str) -> None:
        self.seconds.setdefault(name, 0.0)
        self.calls.setdefault(name, 0)
        started = {}

        def pre(*_):
            started["t"] = time.perf_counter()

        def post(*_):
            self.seconds[name] += time.perf_counter() - started["t"]
            self.calls[name] += 1

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
