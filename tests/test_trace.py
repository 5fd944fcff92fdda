"""raas_flex.tracing / AttentionTrace / classify_heads / raas_flex.plots on tiny random models (CPU, fp32).

The model is the one of test_hf.py (hidden 64, 2 layers, 4 query heads / 2 KV heads, head_dim 16), patched
with page_size 8 and a 32-token budget, so that 60 new tokens evict pages. The classification is checked on
synthetic maps built to show each pattern.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import hf_batches
import raas_flex
from raas_flex import hf, plots
from raas_flex.trace import AttentionTrace, classify_heads, classify_map, summary_table

LAYERS, HKV, G = 2, 2, 2
VOCAB, PAD = hf_batches.VOCAB, hf_batches.PAD
PS, BUDGET, NEW = 8, 32, 60
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread", "unpatch_everything")


def make_model(family="qwen2", seed=3):
    cls_cfg, cls_model, extra = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
    }[family]
    cfg = cls_cfg(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=HKV * G, num_key_value_heads=HKV, head_dim=16, max_position_embeddings=1024,
                  initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=PAD,
                  tie_word_embeddings=False, **extra)
    torch.manual_seed(seed)
    model = cls_model(cfg).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def prompts(lengths, seed=4):
    return hf_batches.prompts(lengths, seed)


def greedy(model, ids, mask, new=NEW, **kwargs):
    return hf_batches.greedy(model, ids, mask, new, **kwargs)


def traced(model, ids, mask, new=NEW, **options):
    with raas_flex.tracing(model, **options) as tr:
        out = greedy(model, ids, mask, new)
    return tr, out


@pytest.fixture(scope="module")
def raas_run():
    """One traced RaaS generation (row 1 of a left-padded batch) with its untraced reference."""
    model = make_model()
    ids, mask = prompts([9, 13])
    raas_flex.patch(model, budget=BUDGET, page_size=PS)
    ref = greedy(model, ids, mask)
    tr, out = traced(model, ids, mask, row=1, max_steps=100)
    cache = hf._runtime_of(model).last_cache
    result = dict(model=model, ids=ids, mask=mask, ref=ref, out=out, trace=tr, cache=cache,
                  stats=raas_flex.stats(model), states=[e.page_state() for e in cache.engines()])
    return result  # the autouse fixture unpatches the model after each test: see repatched()


def repatched(run):
    """(model, ids, mask) of the module's RaaS run, patched again as it was."""
    raas_flex.patch(run["model"], budget=BUDGET, page_size=PS)
    return run["model"], run["ids"], run["mask"]


# -- recording ---------------------------------------------------------------------------------------------
def test_tracing_changes_no_output_and_records_every_step(raas_run):
    tr, ref, out = raas_run["trace"], raas_run["ref"], raas_run["out"]
    assert torch.equal(out, ref)
    assert tr.steps == NEW - 1  # the last generated token is never fed back
    assert not tr.truncated and tr.truncation == []
    assert tr.layers == (0, 1) and tr.heads == (0, 1) and tr.members == 1
    assert tr.prompt_tokens == 13 and tr.prompt_pages == 2 and tr.page_size == PS
    assert tr.policy == "raas" and tr.budget == BUDGET
    n_pages = math.ceil((13 + 100) / PS)  # max_pages default: prompt + max_steps tokens
    assert tr.share.shape == (100, LAYERS, HKV, 1, n_pages)
    assert tr.resident.shape == tr.refreshed.shape == (100, LAYERS, HKV, n_pages)
    assert tr.nbytes == 100 * LAYERS * HKV * n_pages * (4 + 2) + 8 * 100 + LAYERS * HKV * n_pages
    assert tr.length[: tr.steps].tolist() == list(range(14, 13 + NEW))
    assert (tr.share[tr.steps:] == 0).all() and not tr.resident[tr.steps:].any()


def test_trace_of_a_prompt_in_pieces_equals_the_one_forward_trace(raas_run):
    """generate's prefill_chunk_size (the prompt in pieces of 5 tokens) records the same trace as the
    prompt in one forward: prompt length, map sizes, resident prompt pages and every step."""
    model, ids, mask = repatched(raas_run)
    ref = raas_run["trace"]
    with raas_flex.tracing(model, row=1, max_steps=100) as tr:
        out = greedy(model, ids, mask, prefill_chunk_size=5)
    assert torch.equal(out, raas_run["ref"])
    assert tr.prompt_tokens == ref.prompt_tokens == 13 and tr.steps == ref.steps
    assert tr.share.shape == ref.share.shape
    assert torch.equal(tr.resident0, ref.resident0) and bool(tr.resident0.any())
    assert torch.equal(tr.resident, ref.resident) and torch.equal(tr.refreshed, ref.refreshed)
    torch.testing.assert_close(tr.share, ref.share, rtol=0, atol=1e-5)


def test_shares_sum_to_one_over_resident_pages(raas_run):
    tr = raas_run["trace"]
    share = tr.share[: tr.steps, ..., 0, :]  # [T, L, H, pages]
    torch.testing.assert_close(share.sum(-1), torch.ones(tr.steps, LAYERS, HKV), rtol=0, atol=1e-5)
    assert (share[~tr.resident[: tr.steps]] == 0).all()  # no mass on a page that is not held
    newest = tr.newest()
    assert (tr.resident[torch.arange(tr.steps), :, :, newest]).all()  # the open page is always resident
    assert (tr.refreshed[: tr.steps] <= tr.resident[: tr.steps]).all()
    # under the default raas (topk, 12.5% of the budget's 4 pages: at least one) one page is refreshed
    # every step, plus the page opened that step
    n_ref = tr.refreshed[: tr.steps].sum(-1)
    assert BUDGET // PS == 4 and ((n_ref >= 1) & (n_ref <= 2)).all() and (n_ref == 1).any()


def test_residency_and_evictions_match_the_engine(raas_run):
    tr, states, stats = raas_run["trace"], raas_run["states"], raas_run["stats"]
    total = 0
    for layer in range(LAYERS):
        ps = states[layer]
        for head in range(HKV):
            held = sorted(int(p) for p in ps.page_id[1, head] if p >= 0)
            res = tr.residency(layer, head)
            assert res.shape[0] == tr.steps + 1
            assert res[-1].nonzero().flatten().tolist() == held
            assert res[0].nonzero().flatten().tolist() == [0, 1]  # the 13-token prompt: pages 0 and 1
            ev = tr.evictions(layer, head)
            assert len(ev) == int(ps.evictions[1, head]) > 0
            assert all(g >= tr.prompt_pages for _, g in ev)  # raas pins the prompt
            assert len({g for _, g in ev}) == len(ev)  # an evicted page never comes back
            for step, g in ev:  # a page is evicted when a new page opens (step at a page boundary)
                assert (13 + step - 1) % PS == 0
                assert tr.share[step - 1, layer, head, 0, g] == 0 and tr.share[step - 2, layer, head, 0, g] > 0
            total += len(ev)
        assert stats["layers"][layer]["evictions"][1] == max(len(tr.evictions(layer, h)) for h in range(HKV))
    assert total > 0


def test_a_subset_of_layers_and_heads_is_the_same_slice(raas_run):
    (model, ids, mask), full = repatched(raas_run), raas_run["trace"]
    tr, out = traced(model, ids, mask, row=1, max_steps=100, layers=[1], heads=1)
    assert torch.equal(out, raas_run["ref"])
    assert tr.share.shape[1:3] == (1, 1)
    torch.testing.assert_close(tr.map(1, 1), full.map(1, 1), rtol=0, atol=0)
    assert tr.evictions(1, 1) == full.evictions(1, 1)
    with pytest.raises(ValueError, match="layer=0 was not traced"):
        tr.map(0, 1)
    with pytest.raises(ValueError, match="head=0 was not traced"):
        tr.map(1, 0)


def test_group_modes_mean_max_each(raas_run):
    (model, ids, mask), mean = repatched(raas_run), raas_run["trace"]
    mx, _ = traced(model, ids, mask, row=1, max_steps=100, group="max")
    each, _ = traced(model, ids, mask, row=1, max_steps=100, group="each")
    assert each.members == G and each.share.shape[3] == G
    T = mean.steps
    torch.testing.assert_close(each.share[:T].mean(3), mean.share[:T, :, :, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(each.share[:T].amax(3), mx.share[:T, :, :, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(each.share[:T].sum(-1), torch.ones(T, LAYERS, HKV, G), rtol=0, atol=1e-5)
    s = mx.share[:T].sum(-1)
    assert (s >= 1 - 1e-5).all() and (s <= G + 1e-5).all()
    assert (s > 1 + 1e-3).any()  # the query heads of a group do disagree somewhere


def test_quest_shares_only_the_attended_pages():
    model = make_model("llama", seed=5)
    ids, mask = prompts([11], seed=6)
    raas_flex.patch(model, budget=16, page_size=PS, policy="quest")
    tr, _ = traced(model, ids, mask, new=40)
    T = tr.steps
    share, res = tr.share[:T, :, :, 0], tr.resident[:T]
    torch.testing.assert_close(share.sum(-1), torch.ones(T, LAYERS, HKV), rtol=0, atol=1e-5)
    attended = (share > 0).sum(-1)
    assert (attended <= 16 // PS).all()  # quest attends to budget/page_size pages
    assert (res.sum(-1) == (tr.newest() + 1)[:, None, None]).all()  # and keeps every page
    assert all(tr.evictions(layer, h) == [] for layer in range(LAYERS) for h in range(HKV))


def test_tracing_off_calls_no_hook_and_tracing_on_calls_it_per_layer_and_step(monkeypatch):
    calls = {"decode": 0, "prefill": 0}
    orig_decode, orig_prefill = AttentionTrace.on_decode, AttentionTrace.on_prefill

    def on_decode(self, *a):
        calls["decode"] += 1
        return orig_decode(self, *a)

    def on_prefill(self, *a):
        calls["prefill"] += 1
        return orig_prefill(self, *a)

    monkeypatch.setattr(AttentionTrace, "on_decode", on_decode)
    monkeypatch.setattr(AttentionTrace, "on_prefill", on_prefill)
    model = make_model()
    ids, mask = prompts([7])
    raas_flex.patch(model, budget=BUDGET, page_size=PS)
    ref = greedy(model, ids, mask, 20)
    assert calls == {"decode": 0, "prefill": 0}
    tr, out = traced(model, ids, mask, 20)
    assert calls == {"decode": LAYERS * 19, "prefill": LAYERS} and torch.equal(out, ref)
    assert hf._runtime_of(model).tracer is None  # the block removed the hook
    assert torch.equal(greedy(model, ids, mask, 20), ref)
    assert calls == {"decode": LAYERS * 19, "prefill": LAYERS}


def _decode_graph(model, ids, mask, steps=3, warm_steps=2):
    """The FX graph of the decode forward captured through dynamo (aot_eager runs it eagerly).

    The first ``warm_steps`` compiled steps may compile up to 1 + HUB_KERNELS_EXTRA_GRAPHS graphs (see
    hf_batches); the ``steps`` after them must compile none and run the last graph captured."""
    from torch._dynamo.backends.registry import lookup_backend

    graphs, aot_eager = [], lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    cache = raas_flex.RaaSCache(model)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend=backend, fullgraph=True)
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
            tok, pos = out.logits[:, -1:].argmax(-1), pos[:, -1:] + 1
            for _ in range(warm_steps):
                out = compiled(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True)
                tok, pos = out.logits[:, -1:].argmax(-1), pos + 1
            warm = len(graphs)
            with torch._dynamo.config.patch(error_on_recompile=True):
                for _ in range(steps):
                    out = compiled(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True)
                    tok, pos = out.logits[:, -1:].argmax(-1), pos + 1
    finally:
        torch._dynamo.reset()
    assert 1 <= warm <= 1 + hf_batches.HUB_KERNELS_EXTRA_GRAPHS and len(graphs) == warm
    return [f"{n.op}:{n.target}" for n in graphs[-1].graph.nodes if n.op in ("call_function", "call_method")]


def test_tracing_off_adds_no_op_to_the_compiled_decode_graph():
    model = make_model("llama", seed=7)
    ids, mask = prompts([9])
    raas_flex.patch(model, budget=BUDGET, page_size=PS)
    before = _decode_graph(model, ids, mask)
    traced(model, ids, mask, 5)
    after = _decode_graph(model, ids, mask)
    with raas_flex.tracing(model), pytest.raises(Exception, match="tracing runs eager"):
        _decode_graph(model, ids, mask)  # a compiled forward that reaches the hook is refused
    assert before == after and len(before) > 50
    # nothing in the step reads back to the host
    assert not any(t.endswith((":item", ":tolist", ":cpu")) or "_local_scalar" in t for t in before)


def test_generate_inside_tracing_runs_eager_even_when_asked_to_compile():
    from transformers import CompileConfig

    model = make_model("llama", seed=8)
    ids, mask = prompts([6])
    raas_flex.patch(model, budget=BUDGET, page_size=PS)
    config = CompileConfig(backend="aot_eager", fullgraph=True, dynamic=False, mode=None)
    config._compile_all_devices = True
    counters = torch._dynamo.utils.counters

    def graphs_compiled(**kwargs):
        torch._dynamo.reset()
        counters.clear()
        out = greedy(model, ids, mask, 12, **kwargs)
        return counters["stats"]["unique_graphs"], out

    try:
        # transformers compiles a small helper of its own even in an eager generate: count relative to it
        eager_graphs, ref = graphs_compiled(disable_compile=True)
        with raas_flex.tracing(model) as tr:
            traced_graphs, out = graphs_compiled(compile_config=config)
        with raas_flex.tracing(model), pytest.raises(ValueError, match="disable_compile=False"):
            greedy(model, ids, mask, 12, disable_compile=False)
    finally:
        torch._dynamo.reset()
        for name in ("_compiled_call", "_last_compile_config"):
            model.__dict__.pop(name, None)
    assert traced_graphs == eager_graphs and "_compiled_call" not in model.__dict__
    assert torch.equal(out, ref) and tr.steps == 11


# -- bounded memory ------------------------------------------------------------------------------------------
def test_steps_past_max_steps_are_flagged_not_recorded():
    model = make_model()
    ids, mask = prompts([9])
    raas_flex.patch(model, budget=BUDGET, page_size=PS)
    with pytest.warns(UserWarning, match="truncated"):
        tr, _ = traced(model, ids, mask, 30, max_steps=10)
    assert tr.share.shape[0] == 10 and tr.steps == 10
    assert tr.truncated and tr.truncation == ["max_steps=10: steps after 10 were not recorded"]
    assert tr.share.shape[-1] == math.ceil((9 + 10) / PS)
    with pytest.warns(UserWarning, match="truncated"):
        tp, _ = traced(model, ids, mask, 30, max_steps=40, max_pages=2)
    assert tp.truncated and tp.truncation[0].startswith("max_pages=2")
    assert tp.share.shape == (40, LAYERS, HKV, 1, 2) and tp.steps == 29
    torch.testing.assert_close(tp.share[:10, ..., :2], tr.share[:10, ..., :2])
    with warnings.catch_warnings():  # exactly at the bound: no flag, no warning
        warnings.simplefilter("error")
        ok, _ = traced(model, ids, mask, 6, max_steps=5)
    assert ok.steps == 5 and not ok.truncated


def test_max_bytes_is_checked_before_allocating():
    model = make_model()
    ids, mask = prompts([9])
    raas_flex.patch(model, budget=BUDGET, page_size=PS)
    with pytest.raises(ValueError, match="max_bytes=1000"):
        traced(model, ids, mask, 5, max_bytes=1000)


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,exc,match", [
    ({"layers": [2]}, ValueError, "layers holds 2, out of range; allowed: 0..1"),
    ({"layers": []}, ValueError, "layers is empty"),
    ({"layers": [0, 0]}, ValueError, "layers has duplicates"),
    ({"layers": "0"}, TypeError, "layers must be"),
    ({"heads": [1.0]}, TypeError, "heads must hold ints"),
    ({"group": "sum"}, ValueError, "group='sum' is not supported; allowed: 'mean', 'max', 'each'"),
    ({"max_steps": 0}, ValueError, "max_steps must be >= 1"),
    ({"max_pages": 2.5}, TypeError, "max_pages must be an int or None"),
    ({"row": -1}, ValueError, "row must be >= 0"),
])
def test_bad_arguments_are_refused(options, exc, match):
    model = make_model()
    raas_flex.patch(model, budget=BUDGET, page_size=PS)
    with pytest.raises(exc, match=match):
        with raas_flex.tracing(model, **options):
            pass
    assert hf._runtime_of(model).tracer is None


@pytest.mark.parametrize("options,match", [
    ({"heads": [2]}, r"heads holds 2, out of range; allowed: 0..1"),
    ({"row": 1}, r"row=1 is out of range for a batch of 1; allowed: 0..0"),
])
def test_arguments_checked_against_the_generation(options, match):
    model = make_model()
    ids, mask = prompts([5])
    raas_flex.patch(model, budget=BUDGET, page_size=PS)
    with pytest.raises(ValueError, match=match):
        traced(model, ids, mask, 3, **options)


def test_misuse_is_refused():
    model = make_model()
    ids, mask = prompts([5])
    with pytest.raises(ValueError, match="patched by raas_flex.patch"):
        with raas_flex.tracing(model):
            pass
    raas_flex.patch(model, budget=BUDGET, page_size=PS)
    with raas_flex.tracing(model) as tr:
        with pytest.raises(RuntimeError, match="already being traced"):
            with raas_flex.tracing(model):
                pass
        greedy(model, ids, mask, 3)
        with pytest.raises(RuntimeError, match="one generation"):
            greedy(model, ids, mask, 3)
    with pytest.raises(ValueError, match="the trace is empty"):
        with raas_flex.tracing(model) as empty:
            pass
        empty.save("unused.pt")
    assert tr.steps == 2


# -- files and plots -----------------------------------------------------------------------------------------
def test_save_load_round_trip(raas_run, tmp_path):
    tr = raas_run["trace"]
    tr.save(tmp_path / "t.pt")
    back = AttentionTrace.load(tmp_path / "t.pt")
    assert back.steps == tr.steps and back.share.shape[0] == tr.steps
    for layer in range(LAYERS):
        for head in range(HKV):
            assert torch.equal(back.map(layer, head), tr.map(layer, head))
            assert torch.equal(back.residency(layer, head), tr.residency(layer, head))
            assert back.evictions(layer, head) == tr.evictions(layer, head)
    assert classify_heads(back) == classify_heads(tr)
    torch.save({"format": "something else"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a raas_flex trace"):
        AttentionTrace.load(tmp_path / "x.pt")


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def test_waterfall_writes_a_png(raas_run, tmp_path):
    tr = raas_run["trace"]
    for norm in plots.NORMS:
        path = plots.waterfall(tr, 1, 0, tmp_path / f"w_{norm}.png", norm=norm)
        assert _is_png(path)
    with pytest.raises(ValueError, match="norm='sqrt' is not supported"):
        plots.waterfall(tr, 0, 0, tmp_path / "bad.png", norm="sqrt")
    with pytest.raises(ValueError, match="layer=5 was not traced"):
        plots.waterfall(tr, 5, 0, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="member=1 out of range"):
        plots.waterfall(tr, 0, 0, tmp_path / "bad.png", member=1)
    assert not (tmp_path / "bad.png").exists()


def test_plots_cli(raas_run, tmp_path, capsys):
    raas_run["trace"].save(tmp_path / "t.pt")
    assert plots.main(["--trace", str(tmp_path / "t.pt"), "--out", str(tmp_path / "o"), "--layers", "1",
                       "--heads", "0", "1"]) == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["summary.json", "waterfall_L1_H0.png", "waterfall_L1_H1.png"]
    assert _is_png(tmp_path / "o" / "waterfall_L1_H1.png")
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["maps"] == LAYERS * HKV and sum(summary["counts"].values()) == LAYERS * HKV
    assert "streaming-like" in capsys.readouterr().out


def test_read_map_of_the_oracle(tmp_path, capsys):
    """plots.read_map draws a testbed chain's reads under the oracle policies; the CLI (--oracle) prints
    each policy's lost reads, LRU none on the ledger chain; bad input is refused."""
    from raas_flex import oracle
    from raas_flex.ledger import ledger_dataset

    assert plots.main(["--oracle", "ledger", "--out", str(tmp_path), "--fraction", "0.25"]) == 0
    assert _is_png(tmp_path / "read_map_ledger.png")
    out = capsys.readouterr().out
    lost = dict(part.rsplit(" ", 1) for part in out.split("at budget ")[1].split(": ", 1)[1].split(", "))
    assert set(lost) == set(oracle.POLICIES) and int(lost["lru"]) == 0 and int(lost["recency"]) > 0
    chain = ledger_dataset(1, seed=0)[0].trace
    with pytest.raises(ValueError, match="simulate\\(..., record=True\\)"):
        plots.read_map(chain, [oracle.simulate(chain, 464, "lru")], tmp_path / "bad.png")
    with pytest.raises(TypeError, match="trace must be a raas_flex.oracle.Trace"):
        plots.read_map("chain", [oracle.simulate(chain, 464, "lru", record=True)], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="--fraction 1.5 is not allowed"):
        plots.main(["--oracle", "ledger", "--out", str(tmp_path), "--fraction", "1.5"])
    assert not (tmp_path / "bad.png").exists()


def test_example_script(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "trace_attention.py"), "--new", "24", "--budget", "32",
         "--page-size", "8", "--out", str(tmp_path), "--layers", "1", "--heads", "0", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    files = set(os.listdir(tmp_path))
    assert {"waterfall_dense_L1_H0.png", "waterfall_raas_L1_H0.png", "summary.json", "trace_dense.pt",
            "trace_raas.pt"} <= files
    assert _is_png(tmp_path / "waterfall_raas_L1_H0.png")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["policy"] == "dense" and summary["maps"] == 2 * 2  # 2 layers x 2 KV heads of the tiny model
    assert "phoenix-bearing" in r.stdout  # the printed table
    evicted = re.search(r"\[raas\] 24 new tokens, 23 steps traced, pages evicted \(summed over layers\): (\d+)", r.stdout)
    assert evicted and int(evicted.group(1)) > 0


# -- classification on synthetic maps --------------------------------------------------------------------------
def newest_pages(T, prompt_pages, every):
    """The newest logical page at steps 1..T when a page opens every ``every`` steps after the prompt."""
    return torch.tensor([prompt_pages - 1 + t // every for t in range(1, T + 1)])


def streaming_map(newest, n_pages, window, sink=0.5):
    """Half of each step's mass on page 0, the rest spread over the ``window`` newest pages."""
    T = len(newest)
    share = torch.zeros(T, n_pages)
    share[:, 0] = sink
    for t in range(T):
        lo = max(1, int(newest[t]) - window + 1)
        share[t, lo:int(newest[t]) + 1] += (1 - sink) / (int(newest[t]) + 1 - lo)
    return share


def normalized(share):
    return share / share.sum(1, keepdim=True)


PARAMS = dict(tau=0.05, sink_pages=1, window=3, gap_steps=20)
patterns = st.fixed_dictionaries({
    "prompt_pages": st.integers(2, 4), "every": st.integers(1, 3), "T": st.integers(70, 120),
    "window": st.integers(2, 4), "gap": st.integers(8, 30),
})


@given(patterns)
def test_streaming_maps_are_streaming_like(p):
    newest = newest_pages(p["T"], p["prompt_pages"], p["every"])
    share = streaming_map(newest, int(newest[-1]) + 1, p["window"])
    c = classify_map(share, newest, p["prompt_pages"], **{**PARAMS, "window": p["window"], "gap_steps": p["gap"]})
    assert c.label == "streaming-like" and c.phoenix_pages == () and c.milestone_pages == ()
    assert c.streaming_fraction == pytest.approx(1.0)


@given(patterns, st.data())
def test_milestone_maps_are_milestone_like(p, data):
    T, w, gap = p["T"], p["window"], p["gap"]
    newest = newest_pages(T, p["prompt_pages"], p["every"])
    share = streaming_map(newest, int(newest[-1]) + 1, w)
    # a decoded page used from its creation until it is >= window pages old, then never again, with at
    # least gap steps left in the trace
    m = p["prompt_pages"] + data.draw(st.integers(0, 3))
    created = int((newest >= m).nonzero()[0]) + 1
    far = int((newest - m >= w).nonzero()[0]) + 1
    end = data.draw(st.integers(far, far + 5))
    assert T - end >= gap
    share[created - 1:end, m] += 0.4
    c = classify_map(normalized(share), newest, p["prompt_pages"], **{**PARAMS, "window": w, "gap_steps": gap})
    assert c.label == "milestone-like" and c.milestone_pages == (m,) and c.phoenix_pages == ()
    # the same page still in use at the end of the trace has not faded: no milestone
    share[end:, m] += 0.4
    c = classify_map(normalized(share), newest, p["prompt_pages"], **{**PARAMS, "window": w, "gap_steps": gap})
    assert c.label != "milestone-like" and c.milestone_pages == () and c.phoenix_pages == ()


@given(patterns, st.integers(0, 10))
def test_phoenix_maps_are_phoenix_bearing_and_a_shorter_gap_is_not(p, extra):
    T, w, gap = p["T"], p["window"], p["gap"]
    newest = newest_pages(T, p["prompt_pages"], p["every"])
    base = streaming_map(newest, int(newest[-1]) + 1, w)
    active = (base[:, 1] >= PARAMS["tau"]).nonzero().flatten()
    last = int(active[-1]) + 1 if len(active) else 0  # last step the prompt page 1 was attended
    back = min(last + gap + extra, T)  # it returns at step `back`
    gap_seen = back - last
    share = base.clone()
    share[back - 1, 1] += 0.5
    c = classify_map(normalized(share), newest, p["prompt_pages"], **{**PARAMS, "window": w, "gap_steps": gap_seen})
    assert c.label == "phoenix-bearing" and c.phoenix_pages == (1,)
    c = classify_map(normalized(share), newest, p["prompt_pages"], **{**PARAMS, "window": w, "gap_steps": gap_seen + 1})
    assert c.phoenix_pages == () and c.label != "phoenix-bearing"


def test_diffuse_maps_are_other_and_edge_cases():
    T, N = 50, 40
    newest = torch.full((T,), N - 1)
    c = classify_map(torch.full((T, N), 1 / N), newest, N, **PARAMS)
    assert c.label == "other" and c.streaming_fraction == pytest.approx(4 / N)
    # no step at all / a map with no mass
    assert classify_map(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 1, **PARAMS).label == "other"
    assert classify_map(torch.zeros(5, 3), torch.full((5,), 2), 1, **PARAMS).streaming_fraction == 0.0
    # the sink page is never a phoenix even when it returns after a long gap
    share = torch.zeros(60, 4)
    share[:, 3] = 1.0
    share[55, 0] = 1.0
    assert classify_map(share, torch.full((60,), 3), 4, **PARAMS).phoenix_pages == ()
    assert classify_map(share, torch.full((60,), 3), 4, **{**PARAMS, "sink_pages": 0}).phoenix_pages == (0,)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"tau": 0.0}, ValueError, "tau=0 is out of range"),
    ({"tau": 1.5}, ValueError, r"tau=1.5 out of range; allowed: 0.0..1.0"),
    ({"window": 0}, ValueError, "window=0 out of range"),
    ({"gap_steps": 2.0}, TypeError, "gap_steps must be an int"),
    ({"streaming_mass": "high"}, TypeError, "streaming_mass must be a number"),
    ({"min_milestones": 0}, ValueError, "min_milestones=0 out of range"),
])
def test_bad_classification_parameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        classify_map(torch.zeros(3, 2), torch.ones(3, dtype=torch.long), 1, **{**PARAMS, **kwargs})


def test_bad_maps_are_refused():
    with pytest.raises(ValueError, match="share must be a 2-D tensor"):
        classify_map(torch.zeros(3), torch.ones(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"newest must have shape \(3,\)"):
        classify_map(torch.zeros(3, 2), torch.ones(4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="newest must be non-decreasing"):
        classify_map(torch.zeros(3, 2), torch.tensor([1, 0, 1]), 1)
    with pytest.raises(TypeError, match="trace must be an AttentionTrace"):
        classify_heads({"share": None})


def test_classify_heads_counts_each_map():
    """A synthetic trace with one map of each pattern: one per label, fractions 1/4."""
    T, pp, every, w, gap = 80, 2, 2, 3, 20
    newest = newest_pages(T, pp, every)
    N = int(newest[-1]) + 1
    stream = streaming_map(newest, N, w)
    milestone = stream.clone()
    milestone[8:16, 3] += 0.4  # page 3 opens at step 4... used until step 16 (newest 9), then never
    phoenix = stream.clone()
    phoenix[60, 1] += 0.5  # prompt page 1: last used at step 5, back at step 61
    other = torch.full((T, N), 1 / N)
    maps = torch.stack([normalized(m) for m in (stream, milestone, phoenix, other)])  # [4, T, N]
    d = {"format": "raas_flex.trace/1", "layers": [0, 1], "heads": [0, 1], "group": "mean", "row": 0,
         "max_steps": T, "max_pages": N, "page_size": 4, "policy": "dense", "budget": 4 * gap, "num_kv_heads": 2,
         "group_size": 1, "prompt_tokens": 4 * pp, "steps": T, "truncated": False, "truncation": [],
         "max_bytes": 2**30, "share": maps.view(2, 2, T, N).permute(2, 0, 1, 3)[:, :, :, None].contiguous(),
         "resident": torch.ones(T, 2, 2, N, dtype=torch.bool), "refreshed": torch.zeros(T, 2, 2, N, dtype=torch.bool),
         "length": (newest + 1) * 4, "resident0": torch.ones(2, 2, N, dtype=torch.bool)}
    tr = AttentionTrace.from_dict(d)
    assert torch.equal(tr.newest(), newest)
    s = classify_heads(tr, window=w, gap_steps=gap)
    labels = [(r["layer"], r["head"], r["label"]) for r in s["heads"]]
    assert labels == [(0, 0, "streaming-like"), (0, 1, "milestone-like"), (1, 0, "phoenix-bearing"), (1, 1, "other")]
    assert s["counts"] == {"milestone-like": 1, "streaming-like": 1, "phoenix-bearing": 1, "other": 1}
    assert s["fractions"]["phoenix-bearing"] == 0.25 and s["maps"] == 4
    assert s["heads"][1]["milestone_pages"] == [3] and s["heads"][2]["phoenix_pages"] == [1]
    assert classify_heads(tr, window=w)["params"]["gap_steps"] == 4 * gap  # default: the budget
    table = summary_table(s)
    assert "milestone-like       1     25.0%" in table
