"""The side-by-side benchmark's own logic: FLOP counting, step timing, the 20-step total, the report and the
README section it generates. (The measurements themselves are runs of bench/side_by_side.py, not tests.)"""

import json
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path[:0] = [str(BENCH), str(BENCH / "peers")]

import flops  # noqa: E402
import protocol  # noqa: E402
import report  # noqa: E402
import side_by_side  # noqa: E402


def test_flops_counts_convolutions_and_matmuls_from_static_shapes(tmp_path):
    # x (1, 3, 8, 8) -> 3x3 conv, 4 out channels, pad 1 -> (1, 4, 8, 8) -> reshape (1, 4, 64) -> matmul (64, 5)
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    m = numpy_helper.from_array(np.ones((64, 5), np.float32), "m")
    shape = numpy_helper.from_array(np.array([1, 4, 64], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "m"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, m, shape])
    path = tmp_path / "g.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    counted = flops.count_flops(path, {"x": (1, 3, 8, 8)})
    assert counted["Convolution"] == 2 * (4 * 8 * 8) * (3 * 3 * 3)
    assert counted["MatMul"] == 2 * (4 * 5) * 64


def test_step_clock_takes_the_median_interval_without_the_first():
    clock = protocol.StepClock()
    clock.times = [0.0, 5.0, 6.0, 7.1, 8.0, 9.0]  # first interval holds the text encoder
    assert clock.per_step() == pytest.approx(1.0)


def _config(name="edgesd-onnxruntime-int8"):
    return next(c for c in side_by_side.default_order() if c.name == name)


def test_configurations_alternate_between_edgesd_and_peers():
    order = side_by_side.default_order()
    families = [c.family == "edgesd" for c in order]
    assert families[:8] == [True, False] * 4
    assert {c.name for c in order} >= {"diffusers-fp32", "optimum-onnx-fp32", "optimum-intel-fp32",
                                       "optimum-intel-int8", "openvino-genai-int8-hybrid", "sdcpp-q8_0",
                                       "edgesd-openvino-int8-hybrid", "edgesd-onnxruntime-fp16"}
    assert len({c.name for c in order}) == len(order)


def test_measure_takes_medians_and_extrapolates_to_twenty_steps():
    rounds = [{"load_s": 2.0, "compile_s": 1.0, "text_encoder_s": 0.2, "unet_s_per_step": 3.0, "vae_decode_s": 4.0,
               "total_s": 30.0, "peak_rss_gb": 2.5},
              {"load_s": 4.0, "compile_s": 1.0, "text_encoder_s": 0.2, "unet_s_per_step": 5.0, "vae_decode_s": 4.0,
               "total_s": 40.0, "peak_rss_gb": 2.7},
              {"error": "crashed"}]
    row = side_by_side.measure(_config(), rounds, steps=8)
    assert row["unet_s_per_step"] == 4.0 and row["rounds"] == 2
    assert row["total_20_s"] == 35.0 + 12 * 4.0 and row["total_20_measured"] is False
    assert row["cold_start_s"] == 4.0
    assert side_by_side.measure(_config(), [{"error": "boom"}], 20) == {"error": "boom"}


def _row(name, family, total, rss):
    return {"name": name, "family": family, "total_20_s": total, "peak_rss_gb": rss, "unet_s_per_step": total / 25,
            "total_20_measured": True, "threads": None, "venv": ".venv" if family == "edgesd" else family}


def test_verdict_says_by_how_much_edgesd_wins_or_loses():
    rows = [_row("edgesd-a", "edgesd", 100.0, 3.0), _row("edgesd-b", "edgesd", 150.0, 2.0),
            _row("peer-x", "x", 200.0, 5.0), _row("peer-y", "y", 80.0, 2.5)]
    lines = report.verdict(rows)
    assert "edgesd-a" in lines[0] and "edgesd/peer = 1.25" in lines[0] and "not met" in lines[0]
    assert "edgesd-b, 2.0 GB" in lines[1] and "not met" in lines[1]
    assert any("vs x" in line and "faster by 100%" in line for line in lines)
    assert any("vs y" in line and "slower by 20%" in line for line in lines)


def test_accelerated_rows_are_kept_out_of_the_like_for_like_verdict(tmp_path, monkeypatch):
    """An opt-in speed-up (another picture) is its own table and never edgesd's 'fastest'."""
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    rows = [_row("edgesd-a", "edgesd", 100.0, 1.4), {**_row("edgesd-a-guidance-cutoff-0.5", "edgesd", 50.0, 1.4),
                                                     "accelerated": True},
            _row("peer-x", "x", 200.0, 5.0), {**_row("peer-x-bf16", "x", 40.0, 5.0), "accelerated": True}]
    lines = report.verdict(rows)
    assert "**edgesd-a**" in lines[0] and "peer-x: 200.0 s" in lines[0] and "0.50 (target <= 0.61: met)" in lines[0]
    assert "1.4 GB (target <= 1.5 GB: met)" in lines[1]
    args = Namespace(machine="vm", steps=4, rounds=1, threads=None, python=None)
    md = report.write(rows, {"fp32": 180.0, "int8": 360.0, "measured": {}}, args).with_suffix(".md").read_text()
    like, fast = md.split("Opt-in speed-ups")
    assert "edgesd-a-guidance-cutoff-0.5" in fast and "edgesd-a-guidance-cutoff-0.5" not in like
    assert "| edgesd-a |" in like


def test_report_files_and_readme_section(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    rows = [{**_row("edgesd-onnxruntime-int8", "edgesd", 160.0, 3.2), "unet_gflops": 200.0, "peak_share": 0.5,
             "unet_tflop_per_step": 1.6},
            {**_row("sdcpp-q8_0", "stable-diffusion.cpp", 900.0, 2.1), "total_20_measured": False},
            {"name": "broken", "family": "x", "error": "failed to load"}]
    args = Namespace(machine="vm", steps=8, rounds=1, threads=None, python=None)
    stem = report.write(rows, {"fp32": 180.0, "int8": 360.0, "measured": {}}, args)
    md = stem.with_suffix(".md").read_text()
    assert "RANDOM weights" in md and "900.0*" in md and "failed: failed to load" in md and "50%" in md
    assert json.loads(stem.with_suffix(".json").read_text())["rows"][0]["name"] == "edgesd-onnxruntime-int8"
    assert stem.with_suffix(".png").stat().st_size > 0
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n")
    report.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert "\nold\n" not in text and "random weights" in text and "edgesd-onnxruntime-int8" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")


def test_readme_without_markers_is_an_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        report.update_readme(readme, tmp_path)


def test_the_project_readme_has_the_generated_section():
    text = (BENCH.parent / "README.md").read_text()
    assert report.BEGIN in text and report.END in text


def test_combine_takes_the_best_peaks_and_every_part_s_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(side_by_side, "roofline", lambda rows, peaks: None)  # needs the SD 1.5 graph
    monkeypatch.setattr(side_by_side.Config, "folder", lambda self: tmp_path)  # builds nothing
    machine = {"name": "device16", "cpu": "x", "cores": 16, "isa": [], "ram_gb": 1.0, "python": "3"}
    parts = []
    for i, (name, fp32) in enumerate((("edgesd-onnxruntime-int8", 900.0), ("edgesd-openvino-fp32", 1300.0))):
        part = {"machine": machine, "versions": {"edgesd": {"onnxruntime": "1"}, "sdcpp": {"x": "1"}},
                "gemm_peaks_gops": {"measured": {"onnxruntime fp32 MatMul": fp32, "openvino f32 MatMul": 800.0,
                                                 "onnxruntime u8 x s8 MatMulInteger": 5000.0 + i}},
                "rows": [{**_row(name, "edgesd", 40.0, 3.0), "threads": 16},
                         {**_row("gone-config", "x", 1.0, 1.0), "threads": 16}]}
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps(part))
    args = Namespace(machine="device16", steps=3, rounds=1, threads=None, python="python3")
    side_by_side.combine(parts, args)
    result = json.loads((tmp_path / f"device16-{report.date.today()}.json").read_text())
    assert result["gemm_peaks_gops"]["fp32"] == 1300.0 and result["gemm_peaks_gops"]["int8"] == 5001.0
    assert [r["name"] for r in result["rows"]] == ["edgesd-onnxruntime-int8", "edgesd-openvino-fp32"]
    assert result["machine"]["cores"] == 16
    assert result["versions"] == {"edgesd": {"onnxruntime": "1"}}  # only the environments that ran rows


def test_a_fresh_clone_builds_the_foundation_before_any_recipe(tmp_path, monkeypatch):
    """side_by_side on a fresh clone: the random-weight folder and its fp32 export are made (by
    sd15_foundation.py's build and export phases, in that order) before a recipe is built from them."""
    import recipes_backends

    monkeypatch.setattr(recipes_backends, "HERE", tmp_path)
    monkeypatch.setattr(recipes_backends, "FP32", tmp_path / "work" / "sd15-random-onnx")
    made = []

    def fake_phase(cmd, **kwargs):
        phase = cmd[-1]
        made.append(phase)
        out = tmp_path / "work" / ("sd15-random" if phase == "build" else "sd15-random-onnx")
        out.mkdir(parents=True, exist_ok=True)
        (out / ("model_index.json" if phase == "build" else "edgesd.json")).write_text("{}")
        return Namespace(returncode=0)

    monkeypatch.setattr(recipes_backends.subprocess, "run", fake_phase)
    assert recipes_backends.foundation() == recipes_backends.FP32
    assert made == ["build", "export"]
    recipes_backends.foundation()  # both there: nothing made again
    assert made == ["build", "export"]

    monkeypatch.setattr(recipes_backends.subprocess, "run", lambda cmd, **kw: Namespace(returncode=1))
    (recipes_backends.FP32 / "edgesd.json").unlink()
    with pytest.raises(SystemExit, match="did not make"):
        recipes_backends.foundation()


def test_every_timed_attention_kernel_computes_the_attention():
    import attention_floor

    shape = (2, 2, 16, 12, 8)  # (batch, heads, queries, keys, head dim)
    q, k, v = attention_floor.attention_inputs(shape)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    expected = ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(2, 16, 16)  # (B, S, heads*D)
    for name, (build, _) in attention_floor.KERNELS.items():
        error = np.abs(build(shape)() - expected).max()
        # int8 products: steps of 4/127 on q, k, v and 1/255 on the probabilities; bf16: 8 bits of mantissa
        assert error < (0.15 if "int8" in name or "bf16" in name else 1e-4), name


def test_the_attention_floor_splits_a_unet_s_products(tmp_path):
    import attention_floor

    # sample (B, 16, 8) -> q/k/v projections (8 x 8) -> one MultiHeadAttention, 2 heads -> output projection
    weights = [numpy_helper.from_array(np.eye(8, dtype=np.float32), n) for n in ("wq", "wk", "wv", "wo")]
    nodes = [helper.make_node("MatMul", ["sample", w], [w + "_out"]) for w in ("wq", "wk", "wv")]
    nodes += [helper.make_node("MultiHeadAttention", ["wq_out", "wk_out", "wv_out"], ["a"], domain="com.microsoft",
                               num_heads=2),
              helper.make_node("MatMul", ["a", "wo"], ["sample_out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [2, 16, 8])],
                              [helper.make_tensor_value_info("sample_out", TensorProto.FLOAT, None)], weights)
    path = tmp_path / "g.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]),
         path)
    shapes, attention, other = attention_floor.attention_shapes(path, {"sample": (2, 16, 8)})
    assert shapes == {(2, 2, 16, 16, 4): 1}
    assert attention == 4 * 2 * 2 * 16 * 16 * 4  # Q K^T and P V, 2 FLOPs per multiply-add
    assert other == 4 * 2 * (2 * 16 * 8) * 8
