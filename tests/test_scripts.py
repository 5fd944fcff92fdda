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
        [sys.executable, str(ROOT / "examples" / "generate.py"), "--model", "tiny", "--new", "80", "--budget", "48",
         "--option", "refresh_ratio=0.34"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "answer (80 tokens" in out
    # budget 48 tokens x 2 layers x 2 KV heads x head_dim 16 x fp32 x (K and V)
    assert f"{2 * 2 * 2 * 48 * 16 * 4 / 2**20:.3f} MiB allocated" in out


def _bench_module(name):
    import importlib

    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(f"benchmarks.{name}")
    finally:
        sys.path.pop(0)


@pytest.mark.compiled
def test_decode_step_smoke_all_policies_and_replot(tmp_path):
    decode_step = _bench_module("decode_step")
    rows = decode_step.main(["--smoke", "--out", str(tmp_path)])
    row = rows[0]
    for policy in ("raas", "h2o", "streaming", "quest"):
        assert row[f"{policy}_err"] < 1e-5, policy
    # quest keeps every token (O(N)); the bounded policies hold exactly the budget
    assert row["quest_kv_bytes"] > row["raas_kv_bytes"] == row["h2o_kv_bytes"] == row["streaming_kv_bytes"]
    # --replot redraws from a results file with timings (a synthetic one: timings come from GPUs)
    fake = dict(meta=dict(device="test", torch="x", dtype="bf16"), rows=[
        dict(B=8, Hq=32, Hkv=8, D=128, N=n, L=2048, raas=70.0, sdpa_L=30.0, sdpa_dense_N=n / 90, quest=300.0)
        for n in (8192, 32768)])
    src = tmp_path / "fake.json"
    src.write_text(json.dumps(fake))
    decode_step.main(["--replot", str(src)])
    png = src.with_suffix(".png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_long_context_benchmark_smoke(tmp_path):
    long_context = _bench_module("long_context")
    rows = long_context.main(["--smoke", "--out", str(tmp_path)])
    dense = [r for r in rows if r["mode"].startswith("dense")]
    raas = [r for r in rows if r["mode"].startswith("raas")]
    assert len(dense) == 1 and len(raas) == 1
    assert dense[0]["ms_per_step"] > 0 and raas[0]["ms_per_step"] > 0
    # the raas run decoded past the budget, so pages were evicted, and KV stayed at the budget
    assert raas[0]["evictions"] > 0
    assert raas[0]["decoded"] + raas[0]["prompt"] > 64
    data = json.loads((tmp_path / "long_context_smoke.json").read_text())
    assert data["rows"] == rows
    assert "| raas budget=64 |" in (tmp_path / "long_context_smoke.md").read_text()


def test_importance_scores_are_exact_shares_and_upper_bounds():
    """page_scores: shares are the softmax mass per page (they sum to 1 for one query head per KV
    head), and the bound is >= every key's q.k on its page (Quest's guarantee), for partial pages too."""
    import torch

    ir = _bench_module("importance_recall")
    torch.manual_seed(0)
    q, k = torch.randn(2, 50, 8, dtype=torch.float64), torch.randn(2, 50, 8, dtype=torch.float64)
    for t in (0, 15, 16, 37, 49):
        share, bound = ir.page_scores(q, k, t, page=16, scale=1.0)
        assert share.shape == bound.shape == (2, t // 16 + 1)
        torch.testing.assert_close(share.sum(-1), torch.ones(2, dtype=torch.float64))
        dots = torch.einsum("hd,htd->ht", q[:, t], k[:, : t + 1])
        for p in range(t // 16 + 1):
            assert (bound[:, p] >= dots[:, p * 16:(p + 1) * 16].amax(-1) - 1e-12).all()
    assert ir.rank_of(torch.tensor([0.5, 0.9, 0.5, 0.1]), 2) == 2  # ties count against the entry


@pytest.mark.skipif(not (ROOT / "models" / "testbed" / "config.json").exists(), reason="no shipped testbed model")
def test_importance_recall_runs_on_the_shipped_model(tmp_path):
    ir = _bench_module("importance_recall")
    res = ir.main(["--model", str(ROOT / "models" / "testbed"), "--problems", "1", "--every", "7",
                   "--out", str(tmp_path), "--name", "ir"])
    assert res["reads"] > 5 and len(res["layers"]) == 4
    for row in res["layers"]:
        for est in ("attention", "bound"):
            tops = [row[f"{est}_top{k}"] for k in res["ks"]]
            assert tops == sorted(tops) and 0 <= tops[0] and tops[-1] <= 1
    # the first layer has a head that puts (nearly) all its attention on the page it must read
    assert res["layers"][0]["mean_share_on_needed_page"] > 0.9 and res["layers"][0]["attention_top4"] == 1.0
    assert "| 0 |" in (tmp_path / "ir.md").read_text()
