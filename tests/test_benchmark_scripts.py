"""The GPU speed benchmark's code paths, run on CPU at tiny shapes (slow: compiles several models)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_device_speed_smoke_runs_every_variant(tmp_path):
    import device_speed

    out = tmp_path / "speed.json"
    device_speed.main(["--device", "cpu", "--smoke", "--repeats", "1", "--out", str(out)])
    variants = json.loads(out.read_text())["variants"]
    timed = {name for name, item in variants.items() if "median_ms" in item}
    assert {"fp32_eager", "bf16_compiled", "w8a8_bf16_compiled", "fp8_linear_bf16_compiled",
            "structured30_bf16_compiled", "2of4_bf16_eager"} <= timed
    assert "fp8-gemm" in variants["fp8_linear_bf16_compiled"]["summary"]
    assert "no sparse kernel used" in variants["2of4_bf16_eager"]["sparse_kernels"]
    assert out.with_suffix(".md").read_text().count("|") > 20
