"""The benchmark and example scripts run (tiny CPU sizes), so they cannot rot unnoticed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.compiled
def test_decode_step_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import decode_step
    finally:
        sys.path.pop(0)
    rows = decode_step.main(["--smoke", "--policies", "raas", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "decode_step_smoke.json").read_text())
    assert data["rows"] == rows and len(rows) == 1
    row = rows[0]
    # the compiled engine step matched the float64 reference inside the script
    assert row["raas_err"] < 1e-5
    assert row["raas_kv_bytes"] == 2 * 2 * 2 * 64 * 16 * 4  # K+V, B=2, Hkv=2, budget 64, D=16, fp32
    assert "| raas |" in (tmp_path / "decode_step_smoke.md").read_text().replace("raas/sdpa_L", "")


def test_generate_example_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "generate.py"), "--new", "80", "--budget", "48"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "answer (80 tokens" in out
    # budget 48 tokens x 2 layers x 2 KV heads x head_dim 16 x fp32 x (K and V)
    assert f"{2 * 2 * 2 * 48 * 16 * 4 / 2**20:.3f} MiB allocated" in out
