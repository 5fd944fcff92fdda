"""The benchmark and example scripts run (tiny CPU sizes), so they cannot rot unnoticed."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._inductor.config

from raas_flex import kernels
from raas_flex import testbed as tb

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.compiled
def test_decode_step_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import decode_step
    finally:
        sys.path.pop(0)
    rows = decode_step.main(["--smoke", "--configs", "raas", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "decode_step_smoke.json").read_text())
    assert data["rows"] == rows and len(rows) == 1
    row = rows[0]
    # the compiled engine step matched the float64 reference inside the script
    assert row["raas_err"] < 1e-5
    assert row["raas_graphs_after_warmup"] == 0  # the later steps reuse the compiled graph(s)
    assert "after each step's warm-up (checks and timed replays, all points): 0" in (tmp_path / "decode_step_smoke.md").read_text()
    assert row["raas_kv_bytes"] == 2 * 2 * 2 * 64 * 16 * 4  # K+V, B=2, Hkv=2, budget 64, D=16, fp32
    assert "| raas |" in (tmp_path / "decode_step_smoke.md").read_text().replace("raas/sdpa_L", "")


@pytest.mark.compiled
def test_decode_step_benchmark_layer_semantics(tmp_path):
    """--layer: every cache gets the layer's window, softcap and sinks, and the script's float64 reference
    applies them too (the engine's output matches it; a reference without them would not)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import decode_step
    finally:
        sys.path.pop(0)
    rows = decode_step.main(["--smoke", "--configs", "raas;streaming:sink_tokens=0", "--layer",
                             "window=40,softcap=2.0,sinks=True", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "decode_step_smoke.json").read_text())
    assert data["meta"]["layer"] == {"window": 40, "softcap": 2.0, "sinks": True}
    assert rows[0]["raas_err"] < 1e-5 and rows[0]["streaming:sink_tokens=0_err"] < 1e-5


def _env_with_checkout():
    """The environment of a script run from this checkout (whether or not raas_flex is installed)."""
    import os

    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""))


def test_generate_example_runs():
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "generate.py"), "--model", "tiny", "--new", "80", "--budget", "48",
         "--option", "refresh_ratio=0.34"],
        capture_output=True, text=True, timeout=300, env=_env_with_checkout(),
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
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


def test_share_columns_pass_gives_page_shares_and_output():
    """share_columns.py's flex pass over [V | one-hot page columns] returns the attention output and
    each page's softmax mass summed over the query heads (against float64 dense attention)."""
    m = _bench_module("share_columns")
    torch.manual_seed(0)
    bh, G, S, D, page = 3, 4, 128, 16, 16
    q, k, v = (torch.randn(bh, 1, n, D) for n in (G, S, S))
    vc = m.column_values(v, page)
    assert vc.shape == (bh, 1, S, D + S // page)
    out, shares = m.columns_step(q, k, vc, D, G)
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / D ** 0.5, dim=-1)  # [bh, 1, G, S]
    want = torch.stack([p[..., i * page:(i + 1) * page].sum((-1, -2)).squeeze(1) for i in range(S // page)], -1)
    torch.testing.assert_close(shares.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), p @ v.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shares.sum(-1).double(), torch.full((bh,), float(G), dtype=torch.float64))


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


def test_decode_step_cold_l2_table_reads_the_cold_times(tmp_path):
    """--cold-l2's table shows the times taken with L2 evicted (keys <name>_cold) and their ratios; the
    flag is refused where nothing is timed."""
    ds = _bench_module("decode_step")
    row = dict(B=8, Hq=28, Hkv=4, D=128, N=32768, L=2048, floor_L=11.0, sdpa_L=12.0, sdpa_L_cold=15.0, raas=16.0,
               raas_cold=18.0, streaming=14.0, streaming_cold=16.5, sdpa_dense_N=120.0, sdpa_dense_N_cold=121.0)
    warm, cold = (ds.markdown([row], ["raas", "streaming"], suffix).splitlines()[-1] for suffix in ("", "_cold"))
    assert "| 12.0 | 16.0 | 14.0 | 120.0 | 1.3 | 7.5 | 1.2 |" in warm
    assert "| 15.0 | 18.0 | 16.5 | 121.0 | 1.2 | 6.7 | 1.1 |" in cold
    with pytest.raises(SystemExit):
        ds.main(["--smoke", "--cold-l2"])
    src = tmp_path / "cold.json"  # --replot of a cold run draws both plots
    src.write_text(json.dumps(dict(meta=dict(device="test", torch="x", dtype="bf16", configs=["raas", "streaming"],
                                             cold_l2=True), rows=[row])))
    ds.main(["--replot", str(src)])
    for png in (src.with_suffix(".png"), tmp_path / "cold_cold.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "olmo3", "gpt_oss"])
def test_hf_generate_builds_each_family_in_its_dtype(family, monkeypatch):
    """hf_generate.build makes the model in the dtype asked for (the whole gpt-oss-20b would not fit one GPU
    in fp32 first), with the family's layer pattern; the default dtype is left as it was."""
    import transformers

    hg = _bench_module("hf_generate")
    monkeypatch.setitem(hg.ARCHS, "tiny", (family, 64, 96, 4, 4, 2, 128))
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "qwen3": transformers.Qwen3ForCausalLM, "olmo3": transformers.Olmo3ForCausalLM,
           "gpt_oss": transformers.GptOssForCausalLM}[family]
    seen, init = [], cls.__init__

    def spy(self, *args, **kwargs):  # the default dtype while the weights are made
        seen.append(torch.get_default_dtype())
        init(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__init__", spy)
    model = hg.build("tiny", None, "cpu", torch.bfloat16)
    assert seen == [torch.bfloat16]
    assert model.config.model_type == family and model.config.num_hidden_layers == 4
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
    if family == "olmo3":
        assert model.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    if family == "gpt_oss":
        assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    with pytest.raises(SystemExit):
        hg.main(["--check-layers", "0"])


def test_decode_step_configurations_are_named_by_their_options():
    """A configuration is named by its user-facing options ('POLICY' or 'POLICY:KEY=VALUE,...'); the
    benchmark's cache is exactly that configuration (with nothing pinned, so that every new page evicts
    one, and its buffer full); bad names and options are refused, not ignored."""
    from raas_flex import RaaS, Streaming

    ds = _bench_module("decode_step")
    args = (1, 2, 1, 16, 128, 64, torch.float32, "cpu", 16)  # B, Hq, Hkv, D, N, L, dtype, device, extra steps
    c = ds.make_cache("raas:importance=attention,refresh=threshold,refresh_threshold=0.01", *args)
    assert c.policy == RaaS(importance="attention", refresh="threshold", refresh_threshold=0.01, pin_prompt=False)
    assert (c.backend, c.page_size, c.S, c.length.tolist()) == ("torch", 16, 64, [48])  # a bounded policy: L - 16
    c = ds.make_cache("raas:backend=torch", *args)
    assert c.policy == RaaS(pin_prompt=False) and c.config.backend == "torch"
    assert ds.make_cache("streaming:sink_tokens=16", *args).policy == Streaming(sink_tokens=16)
    c = ds.make_cache("quest", *args)
    assert c.policy.name == "quest" and c.S == 144 and c.length.tolist() == [128]  # O(N): N + extra steps
    with pytest.raises(TypeError, match=r"unknown option 'fused'; allowed: .*backend"):
        ds.make_cache("raas:fused=True", *args)
    with pytest.raises(TypeError, match=r"unknown option 'sink_tokens' \('sink_tokens' belongs to another policy\)"):
        ds.make_cache("raas:sink_tokens=4", *args)
    with pytest.raises(ValueError, match="policy 'lru' is not one of raas, quest, h2o, streaming, dense"):
        ds.main(["--smoke", "--configs", "raas;lru"])  # before the first grid point
    with pytest.raises(ValueError, match="KEY=VALUE, got 'refresh'"):
        ds.main(["--smoke", "--configs", "raas:refresh"])


def test_long_context_dense_flash_anchor_and_floor(tmp_path):
    """The dense_flash kind runs the engine's dense policy (each --dense-flash-configs configuration) at
    each dense context and the ratio table holds the raas row against both dense rows; estimates for it scale from dense; floor_ms needs a
    measured copy bandwidth (None on CPU)."""
    long_context = _bench_module("long_context")
    done = [dict(kind="dense", N=8192, wall_s=100.0, t_timed_s=10.0)]
    assert long_context.estimate_s("dense_flash", 16384, done, 16, 1)[0] == pytest.approx(100 + 1 * 20)
    rows = long_context.main(["--smoke", "--order", "dense,raas,dense_flash,dense_flex", "--lean", "--out", str(tmp_path)])
    flash = [r for r in rows if r["kind"] == "dense_flash"]
    flex = next(r for r in rows if r["kind"] == "dense_flex")  # transformers' static cache, flex_attention
    assert flex["ms_per_step"] > 0 and flex["mode"] == "dense static compiled, flex_attention"
    raas = next(r for r in rows if r["kind"] == "raas")
    assert flash and all("ms_per_step" in r and r["attended_tokens"] == r["tokens_kept"] for r in flash)
    assert {r["config"] for r in flash} == {"dense"}  # --dense-flash-configs' default
    # --lean: the greedy_decode loop was timed (a difference of two CPU wall times of 4 tiny steps: its sign
    # is noise on a busy CPU, so only that it is a number) and compiled nothing while timed
    assert math.isfinite(raas["lean_ms_per_step"])
    assert raas["lean_graphs_compiled"] == 0
    assert "lean loop (greedy_decode)" in (tmp_path / "long_context_smoke.md").read_text()
    assert raas["floor_ms"] is None and flash[0]["floor_ms"] is None  # (no GPU: no bandwidth measured)
    data = json.loads((tmp_path / "long_context_smoke.json").read_text())
    assert data["meta"]["compile_mode"] == "reduce-overhead"  # --compile-mode's default: transformers' own
    ratios = data["ratios"]
    assert {q["dense_kind"] for q in ratios if q["mode"] == raas["mode"]} == {"dense", "dense_flash", "dense_flex"}
    with pytest.raises(SystemExit):
        long_context.main(["--smoke", "--compile-mode", "default", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        long_context.main(["--smoke", "--order", "dense,flash", "--out", str(tmp_path)])
    for bad in ("dense;dense", "quest", "dense:refresh"):
        with pytest.raises(SystemExit):
            long_context.main(["--smoke", "--order", "dense_flash", "--dense-flash-configs", bad, "--out", str(tmp_path)])


def test_long_context_benchmark_smoke(tmp_path, monkeypatch):
    import torch

    long_context = _bench_module("long_context")
    # '8x' parsing and resolution against this run's dense rows
    assert long_context.parse_raas_batches("128, 8x,0.5x") == [("abs", 128), ("mul", 8.0), ("mul", 0.5)]
    for bad in ("0", "x", "-2x", "8y"):
        with pytest.raises(ValueError, match="--raas-batches"):
            long_context.parse_raas_batches(bad)
    dense_rows = [dict(kind="dense", mode="dense static compiled", B=8, N=n, ms_per_step=1.0, max_batch_kv_fits=f)
                  for n, f in ((8192, 100), (32768, 27))]
    b, derived = long_context.resolve_batch(("mul", 8.0), dense_rows)
    assert b == 216 and derived["dense_N"] == 32768 and derived["dense_max_batch_kv_fits"] == 27
    with pytest.raises(LookupError, match="allocation check needs CUDA"):
        long_context.resolve_batch(("mul", 8.0), [dict(dense_rows[0], max_batch_kv_fits=None)])

    # deadline estimates: quest from dense at the nearest context (warm-up + timed generate scale with N),
    # a bigger raas batch from the raas run (timed generate scales with the bytes a step reads)
    done = [dict(kind="dense", N=8192, wall_s=100.0, t_timed_s=10.0),
            dict(kind="raas", B=8, decoded=1120, wall_s=120.0, t_timed_s=15.0)]
    assert long_context.estimate_s("quest", 32768, done, 16, 1)[0] == pytest.approx(100 + 3 * 20)
    assert long_context.estimate_s("raas", (216, 1120), done, 16, 1)[0] == pytest.approx(120 + (232 / 24 - 1) * 15)
    assert long_context.estimate_s("quest", 8192, [], 16, 1)[0] is None  # nothing ran yet
    # nothing comparable (no dense or quest yet): no guess from raas, so a deadline that has time left runs it
    est, how = long_context.estimate_s("quest", 8192, done[1:], 16, 1)
    assert est is None and "no earlier quest" in how
    assert long_context.estimate_s("dense", 8192, done[1:], 16, 1)[0] is None

    # several raas-style configurations in one run: each one's same-batch tokens/s against the first's;
    # a bad list is refused
    both = [dict(kind="raas", config="raas", B=8, ms_per_step=8.0, tokens_per_s=1000.0),
            dict(kind="raas", config="raas:backend=flex", B=8, ms_per_step=10.0, tokens_per_s=800.0),
            dict(kind="raas", config="raas:backend=flex", B=16, ms_per_step=12.0, tokens_per_s=1333.0)]
    assert long_context.attention_ratios(both) == [dict(B=8, base="raas", config="raas:backend=flex",
                                                        base_ms_per_step=8.0, ms_per_step=10.0,
                                                        tokens_per_s_ratio=0.8)]
    for bad in ("raas;raas", "raas;lru", "quest", "raas:refresh", ";"):
        with pytest.raises(SystemExit):
            long_context.main(["--smoke", "--out", str(tmp_path), "--raas-configs", bad])
    for bad in ("quest;quest", "raas", "quest:refresh", ";"):
        with pytest.raises(SystemExit):
            long_context.main(["--smoke", "--out", str(tmp_path), "--quest-configs", bad])

    # The allocation-checked largest batch needs CUDA; on CPU pretend the dense KV fits once more so
    # that 8x resolves (8 x 1 = 8). A simulated OOM in the quest run at N=80 must become an error row,
    # reset the compile state, and not stop the run.
    monkeypatch.setattr(long_context, "largest_batch", lambda *a, **k: 1)
    warm_up, resets = long_context.warm_up, []

    def warm_up_oom_at_80(model, ids, new, device, **kw):
        if ids.shape[1] == 80 - 4 and "cache_implementation" not in kw:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return warm_up(model, ids, new, device, **kw)

    monkeypatch.setattr(long_context, "warm_up", warm_up_oom_at_80)
    reset = long_context.reset_state
    monkeypatch.setattr(long_context, "reset_state", lambda *a: (resets.append(1), reset(*a)))
    rows = long_context.main(["--smoke", "--out", str(tmp_path), "--raas-batches", "8x",
                              "--quest-contexts", "80,96"])
    dense = [r for r in rows if r["kind"] == "dense"]
    raas = [r for r in rows if r["kind"] == "raas"]
    quest = [r for r in rows if r["kind"] == "quest"]
    assert [r["kind"] for r in rows] == ["dense", "raas", "raas", "quest", "quest"]
    assert dense[0]["ms_per_step"] > 0 and dense[0]["max_batch_kv_fits"] == 1
    for r in raas + dense + quest[1:]:
        assert "error" not in r and "skipped" not in r, r
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0 and r["kv_gb"] > 0
    # the raas run decoded past the budget, so pages were evicted, and KV stayed at the budget
    assert raas[0]["B"] == 2 and raas[0]["evictions"] > 0
    assert raas[0]["decoded"] + raas[0]["prompt"] > 64
    assert raas[0]["prompt"] == 40 and raas[0]["prefill_chunk"] == 32  # the raas prompt in pieces too: 32 + 8
    assert raas[1]["batch_spec"] == "8x" and raas[1]["B"] == 8
    assert raas[1]["derived_from"]["dense_max_batch_kv_fits"] == 1 and raas[1]["derived_from"]["dense_N"] == 96
    assert raas[1]["kv_gb"] == pytest.approx(4 * raas[0]["kv_gb"])  # KV is budget x batch
    assert raas[1]["evictions"] == 4 * raas[0]["evictions"]
    # quest N=80: the simulated OOM is a row; quest N=96 then ran: every token kept, none evicted,
    # prompt of N - steps tokens in pieces of --prefill-chunk (32 in the smoke run: 32 + 32 + 28)
    oom = quest[0]
    assert oom["N"] == 80 and oom["oom"] and oom["error"].startswith("OOM: ") and oom["state_reset"] is True
    assert "warm-up" in oom["phase"]
    ok = quest[1]
    assert ok["N"] == 96 and ok["prompt"] == 92 and ok["tokens_kept"] == 95 and ok["evictions"] == 0
    assert ok["slots"] >= 96 and ok["attended_tokens"] == 64 and ok["prefill_chunk"] == 32
    assert ok["kv_gb"] > dense[0]["kv_gb"] * 0.99  # O(N): at least what dense keeps
    assert len(resets) >= 3  # dense -> raas, raas -> quest, after the OOM
    data = json.loads((tmp_path / "long_context_smoke.json").read_text())
    assert data["rows"] == rows
    meta = data["meta"]
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__ and meta["wall_s"] > 0
    assert "--raas-batches 8x" in meta["command"] and meta["transformers"] and meta["interrupted"] is None
    # ratios: every measured raas/quest row against the dense context (quest only at its own N)
    ratios = data["ratios"]
    assert [(q["mode"], q["B"]) for q in ratios] == [("raas budget=64", 2), ("raas budget=64", 8), ("quest budget=64", 2)]
    for q, r in zip(ratios, raas + quest[1:]):
        assert q["dense_N"] == 96
        assert q["tokens_per_s_ratio"] == pytest.approx(r["tokens_per_s"] / dense[0]["tokens_per_s"])
        assert q["kv_ratio_dense_over"] == pytest.approx(dense[0]["kv_gb"] / r["kv_gb"])
    md = (tmp_path / "long_context_smoke.md").read_text()
    assert "| raas budget=64 |" in md and "| quest budget=64 |" in md and "KV ratio (dense / row)" in md
    assert "8x of dense largest batch 1 at N=96" in md
    assert not (tmp_path / "long_context.partial.json").exists()

    # a deadline already passed: the first measurement runs, every later one is a skip row; without the
    # patched probe, 8x cannot resolve on CPU and says why
    monkeypatch.undo()
    out2 = tmp_path / "deadline"
    rows = long_context.main(["--smoke", "--out", str(out2), "--deadline-s", "0.001", "--raas-batches", "3,8x",
                              "--quest-contexts", "96"])
    assert [r["kind"] for r in rows] == ["dense", "raas", "raas", "raas", "quest"]
    assert rows[0]["ms_per_step"] > 0 and rows[0]["max_batch_kv_fits"] is None
    skipped = [r for r in rows if "skipped" in r]
    assert [(r["kind"], r["B"]) for r in skipped] == [("raas", 2), ("raas", 3), ("quest", 2)]
    for r in skipped:
        assert r["skipped"] == "deadline" and r["time_left_s"] < 0 and "ms_per_step" not in r
    assert "allocation check needs CUDA" in rows[3]["error"] and rows[3]["batch_spec"] == "8x"
    data = json.loads((out2 / "long_context_smoke.json").read_text())
    assert data["rows"] == rows and data["meta"]["deadline_s"] == 0.001 and data["ratios"] == []
    assert "skipped: deadline" in (out2 / "long_context_smoke.md").read_text()


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
    part = res["kinds"]["lagged"]
    assert list(res["kinds"]) == ["lagged"] and res["reads"] == part["reads"] > 5 and len(part["layers"]) == 4
    for row in part["layers"]:
        for est in ("attention", "bound"):
            tops = [row[f"{est}_top{k}"] for k in res["ks"]]
            assert tops == sorted(tops) and 0 <= tops[0] and tops[-1] <= 1
    # the first layer has a head that puts (nearly) all its attention on the page it must read
    assert part["layers"][0]["mean_share_on_needed_page"] > 0.9 and part["layers"][0]["attention_top4"] == 1.0
    assert "| 0 |" in (tmp_path / "ir.md").read_text()


def test_importance_recall_milestone_reads_come_from_the_trace(tmp_path):
    """--task milestone: the far reads of each problem's trace, split into question (fact) and chain
    (milestone) pages; every read is older than the query's recent pages and its page is visible."""
    ir = _bench_module("importance_recall")
    prob = tb.milestone_dataset(1, seed=0)[0]
    reads = list(ir.trace_reads(prob, 16, 1))
    kinds = {kind for *_, kind in reads}
    assert kinds == {"fact", "milestone"}
    for t, need, kind in reads:
        assert need <= t // 16 - ir.RECENT_PAGES and (need * 16 < prob.trace.prompt_len) == (kind == "fact")
    # a milestone read: the page holding milestone 060's value, read by line 061 and later
    text = prob.question + prob.cot
    m60 = (len(tb.encode_text(text[:text.index("060!")])) + text[text.index("060!"):].index("\n") - 1) // 16
    assert any(kind == "milestone" and need == m60 for _, need, kind in reads)
    res = ir.main(["--model", str(ROOT / "models" / "milestone"), "--task", "milestone", "--problems", "1",
                   "--every", "25", "--out", str(tmp_path), "--name", "irm"])
    assert set(res["kinds"]) == {"fact", "milestone"} and res["ks"] == list(ir.MILESTONE_KS)
    for part in res["kinds"].values():
        for row in part["layers"]:
            for est in ("attention", "bound"):
                tops = [row[f"{est}_top{k}"] for k in res["ks"]]
                assert tops == sorted(tops) and 0 <= tops[0] and tops[-1] <= 1
    assert "fact reads" in (tmp_path / "irm.md").read_text()


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")
def test_kernel_resources_compiles_for_sm90_without_a_gpu(tmp_path):
    """The resource report compiles the shipped kernels for sm_90 on this CPU machine, specialised as
    a launch would be, with a Python float argument typed fp64 as torch.compile launches it (a kernel
    whose fp32 softmax state turns fp64 fails to compile), and reads back registers, shared memory,
    pipelined loads, code size and a hash of the machine code (quest's three kernels too). fused_step is compiled under the plans
    (kernels.step_plan) of GPUs of 132 and 1 SMs, which build it with the observer last and the online
    combine, with the observer first and full row writes, without the observer, and with the writer;
    streaming's build too; an unknown observe or kernel name is refused."""
    kr = _bench_module("kernel_resources")
    out = tmp_path / "res.json"
    small = ["--head-dim", "16", "--page-size", "8"]
    rows = kr.main(["--shapes", "1/4/2", *small, "--budgets", "256", "--out", str(out)])
    assert [r["kernel"] for r in rows] == ["_append_kernel", "_step_kernel", "_quest_kernel", "_pick_kernel",
                                           "_paged_kernel"]
    assert [r["op"] for r in rows] == ["fused_append_observe", "fused_step", "quest_step", "quest_step", "paged_attend"]
    assert rows[1]["grid"] == [2, 4 + 1]  # 132 SMs: 4 programs per row (one per tile) and the observer
    assert json.loads(out.read_text())["rows"][0]["registers"] == rows[0]["registers"]
    first = kr.main(["--shapes", "1/4/2", *small, "--budgets", "256", "--sms", "1", "--kernels", "_step_kernel"])
    assert first[0]["grid"] == [2, 2 + 1]  # one SM: 2 programs per row, the observer first in the grid
    plain = kr.main(["--shapes", "2/4/2", *small, "--budgets", "256", "--sms", "1", "--kernels", "_step_kernel"])
    assert plain[0]["grid"] == [4, 1]  # 4 rows on one SM: no observer
    writer = kr.main(["--shapes", "1/4/2", *small, "--budgets", "1024", "--kernels", "_step_kernel"])
    assert writer[0]["grid"] == [2, 16 + 2]  # 16 programs per row: the observer and the writer
    steps = [rows[1], first[0], plain[0], writer[0]]
    assert all(0 < r["registers"] <= 255 for r in [rows[0], *steps])
    # compiled as a launch specialises it (16-byte aligned pointers), the K/V tile loads of programs
    # of more than one tile are pipelined into asynchronous copies
    assert first[0]["async_copies"] > 0 and plain[0]["async_copies"] > 0
    assert all(r["dynamic_shared_bytes"] > 0 for r in steps)
    # code size: the whole step (append, attention, bounds, combine) is longer than the append kernel
    assert 0 < rows[0]["sass_instructions"] < rows[1]["sass_instructions"]
    # the machine code's hash: one launch compiled again gives the same, other kernels and plans others
    again = kr.main(["--shapes", "1/4/2", *small, "--budgets", "256", "--kernels", "_step_kernel"])
    assert again[0]["sass_sha1"] == rows[1]["sass_sha1"]
    assert len({r["sass_sha1"] for r in [*rows, *steps[1:]]}) == len(rows) + 3
    # occupancy: programs an SM holds, and the grid's waves on the GPU the plan was made for
    for r, sms in zip(steps, (132, 1, 1, 132)):
        per_sm = kr.programs_per_sm(r["registers"], r["warps"], r["shared_bytes"] + r["dynamic_shared_bytes"])
        assert r["per_sm"] == per_sm >= 1 and r["waves"] == -(-r["grid"][0] * r["grid"][1] // (per_sm * sms))
    # streaming's build (observe 4: no observe, its own eviction rule) is a kernel of its own
    stream = kr.main(["--shapes", "1/4/2", *small, "--budgets", "256", "--observe", "4", "--kernels", "_step_kernel"])
    assert stream[0]["observe"] == 4 and stream[0]["sass_sha1"] != rows[1]["sass_sha1"]
    with pytest.raises(SystemExit):
        kr.main(["--observe", "5"])
    with pytest.raises(SystemExit):
        kr.main(["--kernels", "_nope"])
    with pytest.raises(SystemExit):
        kr.main(["--shapes", "8/32"])


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")
def test_torch_compile_takes_no_kernel_to_write_its_inputs():
    """Inductor decides from a user kernel's Triton IR what it writes, and counts a call's results as
    derived from every argument of the call. The step's query, new key and new value are loaded apart
    from the position and the open slot, which address its stores; found written, they would make
    the model's copy of the new key into the engine's ``k_new`` wait for the step, in a launch of its
    own per layer and token. Every kernel, every observe of the step: only state is written."""
    kr = _bench_module("kernel_resources")
    small = ["--shapes", "1/4/2", "--head-dim", "16", "--page-size", "8", "--budgets", "256"]
    rows = kr.main([*small, "--observe", "0,1,2,3,4"])
    assert {r["kernel"] for r in rows} == {"_append_kernel", "_step_kernel", "_quest_kernel", "_pick_kernel",
                                           "_paged_kernel"}
    for r in rows:
        assert r["writes"], r["kernel"]  # the analysis ran and found the kernel's stores
        inputs = {"q_ptr", "kn_ptr", "vn_ptr"} | ({"bound_ptr"} if r["kernel"] == "_pick_kernel" else set())
        assert not inputs & set(r["writes"]), (r["kernel"], r["observe"], r["writes"])
    step = next(r for r in rows if r["kernel"] == "_step_kernel")
    assert {"k_ptr", "v_ptr", "page_id_ptr", "stamp_ptr", "out_ptr"} <= set(step["writes"])


def test_programs_per_sm_follows_the_sm90_limits():
    """Registers go per warp in units of 256 (168 per thread: 3 programs of 4 warps; 176: 2), shared
    memory per block plus 1 KB reserved out of 228 KB, at most 64 warps and 32 blocks."""
    kr = _bench_module("kernel_resources")
    assert kr.programs_per_sm(168, 4, 40_000) == 3
    assert kr.programs_per_sm(176, 4, 40_000) == 2
    assert kr.programs_per_sm(128, 4, 0) == 4
    assert kr.programs_per_sm(64, 4, 80_000) == 2  # shared memory bounds it
    assert kr.programs_per_sm(16, 1, 0) == 32  # the block limit
    assert kr.programs_per_sm(255, 8, 0) == 1


def test_cpu_generate_alternates_rounds_and_reports_the_median(tmp_path):
    import statistics

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cpu_generate
    finally:
        sys.path.pop(0)
    rows = cpu_generate.main(["--new", "6", "--rounds", "3", "--budget", "256", "--tag", "t", "--out", str(tmp_path)])
    dense, raas = rows
    assert len(dense["seconds"]) == len(raas["seconds"]) == 3 and dense["first"] == dense["seconds"][0]
    assert raas["ratios"] == [a / b for a, b in zip(raas["seconds"], dense["seconds"])]
    assert raas["ratio"] == statistics.median(raas["ratios"]) and raas["first_ratio"] == raas["ratios"][0]
    assert raas["same_tokens_as_dense"]  # 53 prompt + 6 new tokens fit the budget: nothing evicted
    data = json.loads((tmp_path / "cpu_generate_t.json").read_text())
    assert data["meta"]["rounds"] == 3 and data["rows"] == json.loads(json.dumps(rows))
    assert "median of rounds" in (tmp_path / "cpu_generate_t.md").read_text()


def test_profile_generate_groups_the_kernels_of_a_recorded_step():
    """profile_generate --per-step's groups, on the kernel names of a step recorded on the H200: cuBLAS's
    GEMMs and split-K reductions are matrix products, the engine's step kernel is the cache's, Inductor's
    pointwise and reduction kernels are the rest."""
    pg = _bench_module("profile_generate")
    text = (ROOT / "benchmarks/results/h200/profile_generate_per_step_llama8b.txt").read_text()
    names = [line.split("ms/step", 1)[1].strip() for line in text.splitlines() if " ms/step  " in line]
    groups = {name: pg.kernel_group(name) for name in names}
    assert groups and all((g == "matmuls") == ("nvjet" in n or "splitKreduce" in n) for n, g in groups.items())
    assert {n for n, g in groups.items() if g == "cache step"} == {"_step_kernel"}
    assert pg.kernel_group("triton_tem_fused__unsafe_view_mm_t_3") == "matmuls"  # an Inductor GEMM template
    assert pg.kernel_group("triton_tem_fused_flex_decoding_0") == "cache step"


def test_long_context_keeps_generates_time_when_the_lean_loop_is_interrupted(tmp_path, monkeypatch):
    """A timeout (SIGTERM's SystemExit) during --lean's loop: generate's time of that row was measured
    and is written, marked lean_interrupted, and the script still exits as asked."""
    long_context = _bench_module("long_context")

    def killed(*a, **k):
        raise SystemExit(143)

    monkeypatch.setattr(long_context, "lean_timed", killed)
    with pytest.raises(SystemExit):
        long_context.main(["--smoke", "--order", "raas", "--lean", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "long_context_smoke.json").read_text())
    (row,) = data["rows"]
    assert row["kind"] == "raas" and row["ms_per_step"] > 0 and row["evictions"] > 0
    assert row["lean_interrupted"] is True and "lean_ms_per_step" not in row
    assert data["meta"]["interrupted"] == "SystemExit(143) during lean loop"
    assert "lean loop interrupted" in (tmp_path / "long_context_smoke.md").read_text()


def test_ncu_stalls_sums_a_recorded_source_page(tmp_path):
    """ncu_stalls over the pick kernel's source pages recorded on an H100 (64 programs of 4 warps):
    the straight-line build ran nearly every SASS line once per warp and waited most on instruction
    fetch; the build whose search is a loop has its loop's lines run many times per warp, holding a
    large share of the samples, and fetch is no longer what it waits on most. The reasons' samples
    sum to each page's total; a page without stall columns is refused."""
    import gzip

    ns = _bench_module("ncu_stalls")
    results = ROOT / "benchmarks/results/h100"
    page = results / "ncu_pick_b8_32x8_l2048/_pick_kernel_sass.csv.gz"
    lines, executed, samples, by_reason = ns.stall_shares(str(page))
    assert 0.99 * lines * 64 * 4 < executed <= lines * 64 * 4
    assert samples > 0 and sum(by_reason.values()) == samples
    assert by_reason.most_common(1)[0][0] == "no_inst"
    warps, looped, loop_samples, most = ns.loop_shares(str(page))
    assert warps == 64 * 4 and most <= 2 and loop_samples < 0.05 * samples
    loop_page = results / "ncu_pick_loop_b8_32x8_l2048/_pick_kernel_sass.csv.gz"
    _, _, samples, by_reason = ns.stall_shares(str(loop_page))
    assert sum(by_reason.values()) == samples and by_reason.most_common(1)[0][0] != "no_inst"
    warps, looped, loop_samples, most = ns.loop_shares(str(loop_page))
    assert warps == 64 * 4 and looped > 0 and most > 8 and loop_samples > 0.25 * samples
    bare = tmp_path / "bare.csv.gz"
    with gzip.open(bare, "wt") as f:
        f.write('"Kernel Name","k"\n"Address","Source","Instructions Executed"\n"0x0","NOP","1"\n')
    with pytest.raises(ValueError, match="no warp-stall columns"):
        ns.stall_shares(str(bare))


def test_plan_variant_changes_fused_steps_plan_for_the_block_only():
    pv = _bench_module("plan_variant")
    from raas_flex.kernels import attention

    shipped = attention.step_plan(32, 2048, 128, 7, 128, 132)
    settings = pv.parse_settings("split=4,ROW_WRITER_MIN_SPLIT=16,STAGES_WIDE_ROWS=32")
    assert settings == {"split": 4, "ROW_WRITER_MIN_SPLIT": 16, "STAGES_WIDE_ROWS": 32}
    with pv.plan_variant(settings) as plans:
        plan = attention.step_plan(32, 2048, 128, 7, 128, 132)  # the name fused_step calls
        shares = attention.step_plan(32, 2048, 128, 7, 128, 132, bounds=False)
    assert (shipped.split, shipped.writer, shipped.stages) == (8, True, 2)
    assert (plan.split, plan.writer, plan.stages) == (4, False, 3)
    assert plans == {(32, 2048, 128, 7, 128, 132, True): plan, (32, 2048, 128, 7, 128, 132, False): shares}
    assert attention.step_plan(32, 2048, 128, 7, 128, 132) == shipped  # restored after the block
    for bad in ("BLOCK_N=32", "NOT_A_RULE=1", "split=0", "split=x", "STAGES_WIDE"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            pv.parse_settings(bad)


def test_plan_variant_compiles_the_variants_build_and_records_it(tmp_path):
    """Through kernel_resources (sm_90, no GPU), a variant of 2 attention programs a row compiles to that
    grid, and the JSON's meta names the variant, the command and the plan fused_step used."""
    pv = _bench_module("plan_variant")
    out = tmp_path / "res.json"
    small = ["--shapes", "1/4/2", "--head-dim", "16", "--page-size", "8", "--budgets", "256", "--kernels", "_step_kernel"]
    path = pv.main(["--set", "split=2", "--script", "kernel_resources", "--", *small, "--out", str(out)])
    data = json.loads(path.read_text())
    assert data["rows"][0]["grid"] == [2, 2 + 1]  # shipped on 132 SMs: [2, 4 + 1] (the test above)
    assert data["meta"]["plan_variant"] == {"split": 2}
    assert data["meta"]["command"].startswith("python benchmarks/plan_variant.py --set 'split=2' --script kernel_resources")
    [made] = data["meta"]["plans"]
    assert made["shape"]["rows"] == 2 and made["plan"]["split"] == 2 and made["plan"]["observer"]


def test_projections_fused_and_separate_read_the_same_weights(tmp_path):
    from benchmarks import projections

    w = projections.layer_weights(64, 160, 4, 2, 16, torch.device("cpu"), torch.float64)
    x, a, m = torch.randn(3, 64, dtype=torch.float64), torch.randn(3, 64, dtype=torch.float64), torch.randn(3, 160, dtype=torch.float64)
    sep, fus = projections.separate(x, a, m, [w]), projections.fused(x, a, m, [w])
    assert len(sep) == 7 and len(fus) == 4
    # q/k/v and gate/up fused are the separate products side by side; o and down are the same product
    torch.testing.assert_close(fus[0], torch.cat(sep[:3], 1))
    torch.testing.assert_close(fus[2], torch.cat(sep[4:6], 1))
    torch.testing.assert_close(fus[1], sep[3])
    torch.testing.assert_close(fus[3], sep[6])
    result = projections.main(["--smoke", "--batches", "1,4", "--reps", "2", "--out", str(tmp_path)])
    assert [(r["batch"], r["form"]) for r in result["rows"]] == [(b, f) for b in (1, 4) for f in ("separate", "fused")]
    assert json.loads((tmp_path / "projections_smoke.json").read_text())["meta"]["layers"] == 2
    with pytest.raises(ValueError, match="--batches"):
        projections.main(["--smoke", "--batches", "0", "--out", str(tmp_path)])


def test_long_context_fuse_projections_runs_every_row_fused(tmp_path):
    from benchmarks import long_context

    long_context.main(["--smoke", "--order", "raas", "--fuse-projections", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "long_context_smoke.json").read_text())
    assert data["meta"]["fuse_projections"] is True
    assert data["rows"] and all("error" not in r and r["ms_per_step"] > 0 for r in data["rows"])
    assert "fuse_projections=True" in (tmp_path / "long_context_smoke.md").read_text()
