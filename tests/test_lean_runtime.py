"""The runtime generates (and reads LoRA files, and describes models) with torch, diffusers, transformers, optimum,
nncf, onnx and safetensors impossible to import."""

import subprocess
import sys
import textwrap

from .conftest import FIXTURES

BLOCKER = """
import sys
BLOCKED = ("torch", "diffusers", "transformers", "optimum", "nncf", "onnx", "safetensors")

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())
"""


def run_blocked(code: str) -> subprocess.CompletedProcess:
    script = BLOCKER + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def _one_layer_lora(model, path):
    """A kohya LoRA over the first weight of the U-Net's weights.json (written with NumPy's safetensors)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    weights = json.loads((model / "unet" / "weights.json").read_text())["weights"]
    name, entry = next((n, e) for n, e in weights.items() if n.endswith("attn1.to_q.weight"))
    key = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
    out, inp = entry["shape"]
    save_file({f"{key}.lora_down.weight": np.ones((2, inp), np.float32) * 0.1,
               f"{key}.lora_up.weight": np.ones((out, 2), np.float32) * 0.1}, str(path))
    return path


def test_generate_without_heavy_libraries(tiny_onnx, tmp_path):
    out = tmp_path / "lean.png"
    lora = _one_layer_lora(tiny_onnx, tmp_path / "lora.safetensors")
    proc = run_blocked(f"""
        import edgesd
        from edgesd.cli import main
        from edgesd.describe import describe
        assert describe({str(tiny_onnx)!r})["family"] == "sd"
        with_lora = edgesd.Pipeline.load({str(tiny_onnx)!r}, loras=[({str(lora)!r}, 1.0)])
        assert with_lora("a red circle", num_inference_steps=2, seed=1).images[0].size == (32, 32)
        pipe = edgesd.Pipeline.load({str(tiny_onnx)!r})
        for scheduler in ("ddim", "pndm", "euler", "euler-a", "heun", "lms", "dpm++2m", "dpm++2m-karras",
                          "dpm++2m-sde-karras", "unipc", "ddpm"):
            result = pipe("a red circle", num_inference_steps=3, seed=1, scheduler=scheduler)
            assert result.images[0].size == (32, 32)
        optimum = edgesd.Pipeline.load({str(FIXTURES / "optimum-onnx-micro")!r})
        assert optimum("a red circle", num_inference_steps=2, seed=1).images[0].size == (32, 32)
        try:
            main(["generate", "a blue square", "--model", {str(tiny_onnx)!r}, "--steps", "2", "-o", {str(out)!r}])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        heavy = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not heavy, heavy
        print("LEAN-OK")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "LEAN-OK" in proc.stdout
    assert out.is_file()


def test_blocker_really_blocks():
    proc = run_blocked("import torch")
    assert proc.returncode != 0 and "blocked" in proc.stderr
