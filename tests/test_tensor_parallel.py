"""raas_flex under transformers' tensor parallelism: 2 CPU processes, gloo over loopback.

A tiny Llama (hidden 64, 4 query / 2 KV heads, head_dim 16, 2 layers, vocab 128) is saved to a tmp dir
and loaded on two ranks with transformers' TP plan (q/k/v colwise, o rowwise, lm_head gathered), so
each rank's attention sees 2 query heads and 1 KV head. Each rank runs: unpatched generate, patched
at a budget holding every token, re-patched at a small budget (evicting), the same with an explicit
RaaSCache (to read its page tables), then unpatched again. The test process runs the same on the
single-process model and compares: tokens equal, logits close, each rank's engines hold its local
heads (half the KV bytes) and its page table equals the single-process page table of those KV heads,
so every rank decides for its own KV heads with no collective in the decode step. A second model with
1 KV head (it cannot shard over 2 ranks) must make ``patch`` raise ValueError on every rank.

The workers are this file run as a script (one process per rank, killed on timeout or on the first
failure); they write their results with torch.save for the test to read.
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hf_batches import PAD, VOCAB, prompts  # tests/ is on the path under pytest and when run as a script

WORLD = 2
TIMEOUT_S = 90  # whole launch; a run takes ~10 s on 2 cores
NEW = 14
LENGTHS = (6, 9)  # left-padded batch; prompt + new - 1 = up to 22 tokens per row
FULL = dict(budget=32, page_size=4)  # holds every token: no eviction
SMALL = dict(budget=16, page_size=4)  # 4 pages for up to 6: evicts
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.1,
            bos_token_id=None, eos_token_id=None, pad_token_id=PAD, tie_word_embeddings=False)


# -- shared by the workers and the single-process reference ------------------------------------------
def _generate(model, **kwargs):
    ids, mask = prompts(LENGTHS, seed=1)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    return {"tokens": out.sequences, "logits": torch.stack(out.logits, 1)}


def _engines(cache):
    res = []
    for eng in cache.engines():
        ps = eng.page_state()
        res.append({"kv_heads": eng.k.shape[1], "q_heads": eng.k.shape[1] * eng.G, "kv_bytes": eng.kv_bytes,
                    "page_id": ps.page_id, "stamp": ps.stamp, "pinned": ps.pinned, "score": ps.score,
                    "evictions": ps.evictions, "length": ps.length})
    return res


def _run_all(model) -> dict:
    import raas_flex

    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    res = {}
    with torch.no_grad():
        res["dense"] = _generate(model)
        raas_flex.patch(model, **FULL)
        res["full"] = _generate(model)
        res["full_stats"] = raas_flex.stats(model)
        raas_flex.patch(model, **SMALL)  # reconfigures in place
        res["small"] = _generate(model)
        res["small_stats"] = raas_flex.stats(model)
        cache = raas_flex.RaaSCache(model)
        # generate's cache argument: "cache" from transformers 5.24 on, "past_key_values" before
        arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        res["small_cache"] = _generate(model, **{arg: cache})
        res["small_engines"] = _engines(cache)
        raas_flex.unpatch(model)
        res["unpatched"] = _generate(model)
    res["attn_implementation"] = model.config._attn_implementation
    return res


# -- worker (one process per rank) --------------------------------------------------------------------
def _load_tp(path):
    from transformers import AutoModelForCausalLM

    try:
        from transformers.distributed import DistributedConfig
    except ImportError:  # transformers before DistributedConfig: the plain TP plan argument
        return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=WORLD),
                                                dtype=torch.float32).eval()


def _worker(workdir: str) -> None:
    from datetime import timedelta

    import raas_flex

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # env://, loopback
    try:
        work = Path(workdir)
        model = _load_tp(work / "model")
        assert (getattr(model, "tp_size", None) or model._tp_size) == WORLD
        res = _run_all(model)
        odd = _load_tp(work / "model_1kv")
        try:
            raas_flex.patch(odd, **SMALL)
            res["odd_error"] = None
        except ValueError as e:
            res["odd_error"] = str(e)
        dist.barrier()
        torch.save(res, work / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- the test -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path) -> None:
    """Run WORLD worker processes; kill them all on timeout or when one fails."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=path)
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    procs, logs = [], []
    try:
        for rank in range(WORLD):
            log = open(workdir / f"rank{rank}.log", "wb")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, __file__, str(workdir)], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            ))
        deadline = time.monotonic() + TIMEOUT_S
        while not (timed_out := time.monotonic() > deadline):
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if codes != [0] * WORLD:
        tails = "\n".join(f"--- rank {r} (exit {c}) ---\n"
                          + (workdir / f"rank{r}.log").read_text(errors="replace")[-3000:]
                          for r, c in enumerate(codes))
        why = f"timed out after {TIMEOUT_S} s (killed)" if timed_out else "failed (the others killed)"
        pytest.fail(f"tensor-parallel workers {why}: exit codes {codes}\n{tails}")


def _same_generation(got: dict, ref: dict, what: str) -> None:
    assert torch.equal(got["tokens"], ref["tokens"]), f"{what}: tokens differ"
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available")
def test_tensor_parallel_generate_matches_single_process(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY, "num_key_value_heads": 1})).save_pretrained(tmp_path / "model_1kv")

    _launch(tmp_path)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = LlamaForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
        single.set_attn_implementation("sdpa")
        ref = _run_all(single)
    finally:
        torch.set_num_threads(n)
    assert ref["small_stats"]["evictions"] > 0 and ref["full_stats"]["evictions"] == 0
    hkv, hq = TINY["num_key_value_heads"] // WORLD, TINY["num_attention_heads"] // WORLD

    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for run in ("dense", "full", "small", "small_cache", "unpatched"):
            _same_generation(res[run], ref[run], f"rank {rank}, {run}")
        assert res["attn_implementation"] == ref["attn_implementation"] == "sdpa"  # unpatch restored
        for name in ("full_stats", "small_stats"):
            got, want = res[name], ref[name]
            assert got["evictions"] == want["evictions"]
            assert got["kv_bytes"] * WORLD == want["kv_bytes"]  # local KV heads only
            for lg, lw in zip(got["layers"], want["layers"], strict=True):
                assert (lg["tokens"], lg["resident_tokens"], lg["evictions"]) == \
                       (lw["tokens"], lw["resident_tokens"], lw["evictions"])
        # each rank's page table is the single-process page table of its own KV heads
        heads = slice(rank * hkv, (rank + 1) * hkv)
        for layer, (eg, ew) in enumerate(zip(res["small_engines"], ref["small_engines"], strict=True)):
            assert (eg["kv_heads"], eg["q_heads"]) == (hkv, hq), f"rank {rank} layer {layer}: local heads"
            assert eg["kv_bytes"] * WORLD == ew["kv_bytes"]
            for key in ("page_id", "stamp", "pinned", "evictions"):
                assert torch.equal(eg[key], ew[key][:, heads]), f"rank {rank} layer {layer}: {key}"
            assert torch.equal(eg["length"], ew["length"])
            torch.testing.assert_close(eg["score"], ew["score"][:, heads], rtol=1e-4, atol=1e-5)
        assert res["odd_error"] is not None and "tensor-parallel over 2 ranks" in res["odd_error"], res["odd_error"]


@pytest.mark.parametrize("tp, hq, hkv, ok", [(2, 4, 2, True), (4, 4, 2, False), (2, 6, 3, False), (2, 4, 1, False),
                                             (3, 6, 3, True), (1, 4, 1, True)])
def test_tensor_parallel_head_check_without_processes(tp, hq, hkv, ok, unpatch_everything):
    """patch's check alone, on a single-process model marked the way transformers marks a TP model
    (``_tp_size``, the ``tp_plan`` of its config): whole heads per rank or a ValueError naming the sizes."""
    import raas_flex
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 16 * hq, "num_attention_heads": hq,
                                            "num_key_value_heads": hkv, "num_hidden_layers": 1}))
    model._tp_size = tp
    if ok:
        raas_flex.patch(model, **SMALL)
    else:
        with pytest.raises(ValueError, match=f"tensor-parallel over {tp} ranks.*{hq} query / {hkv} KV heads"):
            raas_flex.patch(model, **SMALL)
        # attention outputs gathered (phi3's and olmo2's plans) or not in the plan (an expert-parallel-only
        # plan): every rank holds all heads
        model.tp_plan = {name: "colwise_gather_output" if name.endswith("_proj") and "self_attn" in name else style
                         for name, style in model.tp_plan.items()}
        raas_flex.patch(model, **SMALL)
        raas_flex.unpatch(model)
        model.tp_plan = {}
        raas_flex.patch(model, **SMALL)


if __name__ == "__main__":
    _worker(sys.argv[1])
