"""Train a small Llama (or Qwen2) model from scratch on the reasoning testbed (raas_flex.testbed).

    python examples/train_testbed.py --out runs/testbed            # one GPU, ~8 minutes (the shipped model)
    python examples/train_testbed.py --smoke --out /tmp/tb          # CPU, seconds: a few steps, tiny model
    python examples/train_testbed.py --task milestone --out runs/milestone   # the milestone task, <= 15 min
    python examples/train_testbed.py --task ledger --value-noise 0.25 --minutes 9 --out runs/ledger   # ledger task

``--task`` picks the task: ``lag`` (default; every value is read by the next line and ``lag`` lines
later) or ``milestone`` (:class:`raas_flex.testbed.MilestoneSpec`, docs/testbed.md: milestones read by
name over a whole phase, filler read once, question facts read again after long gaps) or ``ledger``
(:class:`raas_flex.ledger.LedgerSpec`: milestones are ledgers of ten keyed digits, each line multiplies
one entry, so a recent window cannot rebuild them). The milestone and ledger tasks train with plain causal
attention on full sequences (``--window`` is refused for them), by default for 13 minutes of wall clock
so that the run with its final evaluation ends within 15 minutes.

``--page-dropout P`` (off by default, either task) hides, for each training sequence, every 16-token
page of keys but the question's with probability P from all queries ``--dropout-recent`` pages or more
after it (a query always sees its own page and the newest ones, as every eviction policy keeps them).
The dropped pages are drawn at random, independent of the task: the model sees KV go missing the way an
eviction policy makes it go missing, without being told which tokens a step needs. It needs a dense 4D
mask (slower attention kernels); evaluation is always dense. With ``--dropout-spread`` each sequence draws
its own rate uniformly from [0, P), so one run sees every sparsity from dense to a small budget's.
``--value-noise P`` (milestone and ledger tasks)
replaces line values in training so that no value follows from the two lines before it
(docs/testbed.md); ``--init DIR`` continues a checkpoint.

``--window MIN MAX`` trains under windowed attention (:func:`raas_flex.testbed.window_mask`): each
sequence of a batch sees its question plus its last W tokens, W drawn uniformly from MIN..MAX, except
a share ``--full-frac`` of sequences that keep plain causal attention. The model then computes each
step from the question and the recent lines, as the task allows, instead of from the whole chain, and
still works with dense attention. The shipped model was trained this way (see its train_log.json).

The model learns to write the whole chain of thought (>= 1,000 tokens) for a question it has not
seen and to answer with the last three values; every step must be right for the answer to be. Loss
is taken on the chain and the answer only (not the question). Training stops at the wall-clock
budget ``--minutes`` (counted from the start of the script) or when the teacher-forced held-out
sequence accuracy reaches ``--target``. Greedy decoding reproduces the reference chain exactly when
every teacher-forced argmax is right, so "tf_seq_acc" (share of held-out sequences whose every
chain token is predicted right) is a one-forward stand-in for the exact-answer accuracy; the real
one (batched greedy ``generate``, dense) is measured at the end.

The held-out evaluation also reports, for the milestone and ledger tasks, the accuracy on the copied
question facts (tf_fact_acc) and on the line values (tf_value_acc), and for the ledger task on the
multipliers copied after ``*`` (tf_copy_acc) and the entries copied into ledger lines (tf_entry_acc), so
a run that stalls shows which step it has not learned.

Every evaluation overwrites ``--out`` with the current model (safetensors + config + tokenizer,
loadable with ``from_pretrained``) and ``train_log.json`` (loss curve, evaluations, parameters,
throughput, device, command), so a run stopped from outside still leaves a usable checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import queue
import sys
import threading
import time
from pathlib import Path

T_START = time.perf_counter()  # the script's start: its imports count toward --minutes

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from raas_flex.config import SUPPORTED_HEAD_DIMS  # noqa: E402
from raas_flex.ledger import LedgerSpec, _encode_ledger, encode_ledger_batch, ledger_dataset  # noqa: E402
from raas_flex.testbed import (  # noqa: E402
    EOS,
    LINE_WIDTH,
    PAD,
    VOCAB,
    TaskSpec,
    MilestoneSpec,
    _encode,
    _encode_milestone,
    build_tokenizer,
    encode_batch,
    encode_milestone_batch,
    parse_answer,
    sample,
    window_mask,
)

ARCHS = ("llama", "qwen2")
NEWLINE_ID, EQUALS_ID, Q_ID, STAR_ID = (VOCAB.index(c) for c in ("\n", "=", "q", "*"))
KEY_IDS = [VOCAB.index(c) for c in "abcdefghij"]  # the ledger task's entry keys
KINDS = ("fact", "value", "copy", "entry")  # token kinds the held-out evaluation scores apart
TASKS = ("lag", "milestone", "ledger")
SMOKE = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, batch_size=4,
             steps=3, eval_problems=4, gen_problems=2, min_lines=12, max_lines=14, lag=4, phase_lines=6,
             phoenix_every=4)
SMOKE_LEDGER = dict(min_lines=24, max_lines=26, phase_lines=11, first_milestone=11)  # a ledger copies ten lines
SPEC_ARGS = {"lag": ("min_lines", "max_lines", "lag"), "milestone": ("min_lines", "max_lines", "phase_lines", "phoenix_every"),
             "ledger": ("min_lines", "max_lines", "phase_lines", "phoenix_every", "first_milestone")}
SPEC_CLASSES = {"lag": TaskSpec, "milestone": MilestoneSpec, "ledger": LedgerSpec}
DEFAULT_MINUTES = {"lag": 8.0, "milestone": 13.0, "ledger": 13.0}


def make_spec(task: str, **overrides):
    """The task's spec (:class:`TaskSpec`, :class:`MilestoneSpec` or :class:`LedgerSpec`) with the given
    fields overridden."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; allowed: {', '.join(TASKS)}")
    return SPEC_CLASSES[task](**overrides)


def encode_problems(rng: np.random.Generator, n: int, spec, split: str, value_noise: float = 0.0):
    """Token ids ``[n, spec.seq_len]`` of ``n`` problems of the spec's task, and the positions to leave
    out of the loss (the milestone and ledger tasks' noisy values; None for the lag task)."""
    if isinstance(spec, LedgerSpec):
        ids, _, noisy = encode_ledger_batch(rng, n, spec, split, value_noise)
        return ids, noisy
    if isinstance(spec, MilestoneSpec):
        ids, _, noisy = encode_milestone_batch(rng, n, spec, split, value_noise)
        return ids, noisy
    return encode_batch(rng, n, spec, split)[0], None


def build_model(arch: str, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                max_positions: int):
    """A from-scratch causal LM over the testbed vocabulary (tied embeddings, RoPE, GQA)."""
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not supported; allowed: {', '.join(ARCHS)}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported by raas_flex; allowed: {SUPPORTED_HEAD_DIMS}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    common = dict(
        vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=True, bos_token_id=1, eos_token_id=EOS,
        pad_token_id=PAD, rms_norm_eps=1e-5, rope_theta=10000.0,
    )
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=False))
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False, sliding_window=None))
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = 1
    return model


class Batches:
    """Training batches made by a background thread (numpy, vectorised) and handed over pinned."""

    def __init__(self, seed: int, batch_size: int, spec: TaskSpec, pin: bool, depth: int = 6, value_noise: float = 0.0):
        self.rng = np.random.default_rng(seed)
        self.batch_size, self.spec, self.pin, self.value_noise = batch_size, spec, pin, value_noise
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self):
        while not self.stop.is_set():
            ids, noisy = encode_problems(self.rng, self.batch_size, self.spec, "train", self.value_noise)
            t = [torch.from_numpy(ids), None if noisy is None or not noisy.any() else torch.from_numpy(noisy)]
            if self.pin:
                t = [None if x is None else x.pin_memory() for x in t]
            while not self.stop.is_set():
                try:
                    self.q.put(t, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ids, positions left out of the loss or None)."""
        return self.q.get()

    def close(self):
        self.stop.set()


def draw_windows(gen: torch.Generator, n: int, window, full_frac: float, seq_len: int) -> torch.Tensor | None:
    """Per-sequence attention windows for one batch (None: plain causal attention for every row)."""
    if window is None:
        return None
    lo, hi = window
    w = torch.randint(lo, hi + 1, (n,), generator=gen)
    return torch.where(torch.rand(n, generator=gen) < full_frac, torch.full_like(w, seq_len), w)


def attention_mask(windows: torch.Tensor | None, ids: torch.Tensor, prompt_len: int):
    if windows is None:
        return None
    return window_mask(windows.to(ids.device), ids.shape[1], prompt_len)


def page_dropout_mask(gen: torch.Generator, n: int, seq_len: int, p: float, page_size: int = 16,
                      recent_pages: int = 1, prompt_len: int = 0, device=None, spread: bool = False):
    """Random page dropout: bool ``[n, 1, seq_len, seq_len]`` (True = attend) on ``device``. Row ``b``
    hides each key page with probability ``p`` (with ``spread``, with its own probability drawn
    uniformly from ``[0, p)``) from every query at least ``recent_pages`` pages later
    (causal; a query always sees its own page and the ``recent_pages - 1`` pages before it, as every
    retention policy keeps the newest pages); pages holding the first ``prompt_len`` tokens (the
    question) are never hidden. Independent of the task. ``p == 0`` returns None (plain causal attention)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"page dropout p={p!r} must be a number in [0, 1)")
    if isinstance(recent_pages, bool) or not isinstance(recent_pages, int) or recent_pages < 1:
        raise ValueError(f"recent_pages={recent_pages!r} must be an int >= 1")
    if p == 0:
        return None
    pages = -(-seq_len // page_size)
    rate = torch.rand(n, 1, generator=gen) * p if spread else torch.full((n, 1), float(p))
    keep = torch.rand(n, pages, generator=gen) >= rate  # [n, pages]
    keep[:, :-(-prompt_len // page_size)] = True
    keep = keep.to(device)
    pos = torch.arange(seq_len, device=device)
    page = pos // page_size
    causal = pos[:, None] >= pos[None, :]
    near = page[:, None] - page[None, :] < recent_pages
    return (causal[None] & (near[None] | keep[:, page][:, None, :]))[:, None]


def loss_fn(model, ids: torch.Tensor, prompt_len: int, windows: torch.Tensor | None = None,
            mask: torch.Tensor | None = None, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy on the chain, answer and </s> (tokens after the question, padding excluded).
    ``mask`` (4D bool over the whole sequence, e.g. :func:`page_dropout_mask`) replaces the window mask;
    ``exclude`` (bool like ``ids``) marks tokens left out of the loss (the milestone task's noisy values)."""
    x = ids[:, :-1]
    if mask is None:
        mask = attention_mask(windows, x, prompt_len)
    else:
        mask = mask[:, :, : x.shape[1], : x.shape[1]].to(x.device, non_blocking=True)
    logits = model(input_ids=x, attention_mask=mask).logits
    target = ids[:, 1:].clone()
    target[:, : prompt_len - 1] = -100
    target[target == PAD] = -100
    if exclude is not None:
        target[exclude[:, 1:]] = -100
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


@torch.no_grad()
def teacher_forced_eval(model, ids: torch.Tensor, prompt_len: int, device, amp, chunk: int,
                        window: int | None = None, columns: bool = True) -> dict:
    """Per-token and per-sequence argmax accuracy on the chain under teacher forcing, and per line
    column (the looked-up b and the computed value v are the hard ones). With ``window`` every
    sequence sees only its question and its last ``window`` tokens."""
    model.eval()
    tok_ok = tok_n = seq_ok = 0
    kind_ok, kind_n = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
    col_ok = np.zeros(LINE_WIDTH)
    col_n = np.zeros(LINE_WIDTH)
    loss_sum = 0.0
    for i in range(0, len(ids), chunk):
        x = ids[i:i + chunk].to(device, non_blocking=True)
        inp = x[:, :-1]
        windows = None if window is None else torch.full((len(x),), window, dtype=torch.long)
        with amp():
            logits = model(input_ids=inp, attention_mask=attention_mask(windows, inp, prompt_len)).logits
        target = x[:, 1:]
        valid = target != PAD
        valid[:, : prompt_len - 1] = False
        pred = logits.argmax(-1)
        ok = (pred == target) | ~valid
        loss_sum += F.cross_entropy(logits.float()[valid], target[valid], reduction="sum").item()
        tok_ok += (ok & valid).sum().item()
        tok_n += valid.sum().item()
        seq_ok += ok.all(-1).sum().item()
        if not columns:  # milestone task: line values ("=v" before the newline), copied facts ("qK:F" before "=")
            nxt = torch.cat([target[:, 1:], torch.full_like(target[:, :1], PAD)], 1)
            prev = torch.roll(target, 1, 1)
            is_value = valid & (nxt == NEWLINE_ID) & (prev == EQUALS_ID)
            fact = valid & (nxt == EQUALS_ID) & (torch.roll(target, 3, 1) == Q_ID)
            # ledger task: the multiplier copied after "*", and the entries copied into a ledger line (a
            # digit after a key letter; in a computed line the key is followed by "*")
            copy = valid & (prev == STAR_ID) & (nxt == EQUALS_ID)
            entry = valid & torch.isin(prev, torch.tensor(KEY_IDS, device=prev.device)) & (target != STAR_ID)
            for kind, m in (("fact", fact), ("value", is_value), ("copy", copy), ("entry", entry)):
                kind_ok[kind] += (ok & m).sum().item()
                kind_n[kind] += m.sum().item()
        # columns of the chain's lines: target index t holds token t + 1
        pos = torch.arange(target.shape[1], device=target.device) + 1 - prompt_len
        col = torch.remainder(pos, LINE_WIDTH)
        for c in range(LINE_WIDTH):
            m = valid & (col == c)[None, :] & (pos >= 0)[None, :]
            col_ok[c] += (ok & m).sum().item()
            col_n[c] += m.sum().item()
    model.train()
    out = {
        "tf_loss": loss_sum / max(tok_n, 1),
        "tf_token_acc": tok_ok / max(tok_n, 1),
        "tf_seq_acc": seq_ok / len(ids),
    }
    if columns:  # the lag task's fixed-width lines: the looked-up b and the computed v
        out.update(tf_b_acc=float(col_ok[6] / max(col_n[6], 1)), tf_v_acc=float(col_ok[8] / max(col_n[8], 1)))
    else:  # milestone and ledger tasks: facts copied from the question, every line's value
        out.update(tf_fact_acc=kind_ok["fact"] / max(kind_n["fact"], 1), tf_value_acc=kind_ok["value"] / max(kind_n["value"], 1))
        if kind_n["entry"]:  # ledger task: multipliers copied after "*", entries copied into ledger lines
            out.update(tf_copy_acc=kind_ok["copy"] / max(kind_n["copy"], 1), tf_entry_acc=kind_ok["entry"] / kind_n["entry"])
    return out


@torch.no_grad()
def generate_eval(model, tok, spec: TaskSpec, n: int, seed: int, device, batch_size: int) -> dict:
    """Exact-answer accuracy of dense greedy ``generate`` on ``n`` held-out problems."""
    from raas_flex.testbed import dataset, milestone_dataset

    model.eval()
    make = ledger_dataset if isinstance(spec, LedgerSpec) else milestone_dataset if isinstance(spec, MilestoneSpec) else dataset
    problems = make(n, seed=seed, spec=spec)
    correct, lengths, t0 = 0, [], time.perf_counter()
    max_new = spec.seq_len - spec.prompt_tokens + 16
    for i in range(0, n, batch_size):
        chunk = problems[i:i + batch_size]
        enc = tok([p.question for p in chunk], return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        new = out[:, enc.input_ids.shape[1]:].cpu()
        for p, row in zip(chunk, new):
            row = row.tolist()
            length = row.index(EOS) + 1 if EOS in row else len(row)
            lengths.append(length)
            correct += parse_answer(tok.decode(row[:length], skip_special_tokens=True)) == p.answer
    model.train()
    return {"gen_problems": n, "gen_acc": correct / n, "gen_mean_len": float(np.mean(lengths)),
            "gen_max_len": int(max(lengths)), "gen_seconds": time.perf_counter() - t0}


def evaluate(model, ids, prompt_len: int, device, amp, args) -> dict:
    """Teacher-forced eval with dense attention and, when training windowed, with the smallest window
    (keys suffixed ``_window``); training stops when both reach ``--target``."""
    chunk = max(1, min(64, args.batch_size))
    ev = teacher_forced_eval(model, ids, prompt_len, device, amp, chunk, columns=args.task == "lag")
    if args.window is not None:
        win = teacher_forced_eval(model, ids, prompt_len, device, amp, chunk, window=args.window[0])
        ev.update({f"{k}_window": v for k, v in win.items()})
    return ev


def save(model, tok, out: Path, log: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (checkpoint, tokenizer, train_log.json)")
    ap.add_argument("--task", default="lag", choices=TASKS, help="lag (default), milestone or ledger (docs/testbed.md)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock budget of the training loop, from script start (default: 8 for lag, 13 for milestone)")
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: time only)")
    ap.add_argument("--target", type=float, default=1.0,
                    help="stop once tf_seq_acc on the held-out set reaches this (default 1.0: every sequence right; with --window, under the smallest window too)")
    ap.add_argument("--no-early-stop", action="store_true",
                    help="train for the whole --minutes even once --target is reached (a fine-tune of a model "
                         "already at the target would otherwise stop at its first evaluation)")
    ap.add_argument("--arch", default="llama", choices=ARCHS)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64, help="problems per step (~1.2k tokens each; milestone ~2k)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine to 5%% by the time budget)")
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=float, default=45.0, help="seconds between held-out evaluations")
    ap.add_argument("--eval-problems", type=int, default=512, help="held-out problems for the teacher-forced eval")
    ap.add_argument("--gen-problems", type=int, default=256, help="held-out problems for the final generate eval")
    ap.add_argument("--min-lines", type=int, default=None)
    ap.add_argument("--max-lines", type=int, default=None)
    ap.add_argument("--lag", type=int, default=None, help="lag task only")
    ap.add_argument("--phase-lines", type=int, default=None, help="milestone and ledger tasks only")
    ap.add_argument("--phoenix-every", type=int, default=None, help="milestone and ledger tasks only")
    ap.add_argument("--first-milestone", type=int, default=None, help="ledger task only: the first ledger's line")
    ap.add_argument("--value-noise", type=float, default=0.0,
                    help="milestone and ledger tasks only: share of line values replaced by another digit in training "
                         "(left out of the loss; later lines read them as written), so that no value follows "
                         "from the two lines before it (docs/testbed.md)")
    ap.add_argument("--page-dropout", type=float, default=0.0,
                    help="probability of hiding each 16-token key page of a training sequence (the question's "
                         "pages excepted) from queries --dropout-recent pages or more after it (default 0: off)")
    ap.add_argument("--dropout-spread", action="store_true",
                    help="each training sequence draws its own --page-dropout rate uniformly from [0, P): from "
                         "dense to as sparse as a small budget, in one run")
    ap.add_argument("--dropout-recent", type=int, default=4,
                    help="pages behind a query (its own included) that --page-dropout never hides (default 4)")
    ap.add_argument("--window", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                    help="train under windowed attention: question + last W tokens, W uniform in MIN..MAX")
    ap.add_argument("--full-frac", type=float, default=0.25,
                    help="with --window: share of sequences trained with plain causal attention")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None, help="start from this checkpoint (a previous --out) instead of scratch")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager on error)")
    ap.add_argument("--smoke", action="store_true", help="tiny model and task, a few steps (CPU test)")
    args = ap.parse_args(argv)
    if args.smoke:
        for k, v in {**SMOKE, **(SMOKE_LEDGER if args.task == "ledger" else {})}.items():
            if k in ("min_lines", "max_lines", "lag", "phase_lines", "phoenix_every", "first_milestone"):
                if getattr(args, k) is None:
                    setattr(args, k, v)
            else:
                setattr(args, k, v)
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "batch_size", "eval_problems"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.minutes is None:
        args.minutes = DEFAULT_MINUTES[args.task]
    if args.minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    if args.window is not None and not 1 <= args.window[0] <= args.window[1]:
        raise ValueError(f"--window MIN MAX needs 1 <= MIN <= MAX, got {args.window}")
    if args.task != "lag" and args.window is not None:
        raise ValueError(f"--window {args.window} is not allowed with --task {args.task} (it trains with plain causal "
                         "attention; use --page-dropout for an optional task-independent sparsity)")
    if args.window is not None and args.page_dropout > 0:
        raise ValueError("--page-dropout and --window cannot be combined; pick one")
    if not 0.0 <= args.value_noise < 1.0:
        raise ValueError(f"--value-noise must be in [0, 1), got {args.value_noise}")
    if args.value_noise > 0 and args.task == "lag":
        raise ValueError(f"--value-noise {args.value_noise} is for --task milestone or ledger only")
    if not 0.0 <= args.page_dropout < 1.0:
        raise ValueError(f"--page-dropout must be in [0, 1), got {args.page_dropout}")
    if args.dropout_spread and args.page_dropout == 0:
        raise ValueError("--dropout-spread needs --page-dropout P > 0 (the largest rate)")
    if args.dropout_recent < 1:
        raise ValueError(f"--dropout-recent must be >= 1, got {args.dropout_recent}")
    if not 0.0 <= args.full_frac <= 1.0:
        raise ValueError(f"--full-frac must be in [0, 1], got {args.full_frac}")
    if args.gen_problems < 0:
        raise ValueError(f"--gen-problems must be >= 0, got {args.gen_problems}")
    return args


def main(argv=None) -> dict:
    # run as a script, the wall-clock budget counts from the imports; called with arguments (tests,
    # notebooks), from the call: a module imported long before must not start with its budget spent
    t_start = T_START if argv is None else time.perf_counter()
    args = parse_args(argv)
    spec_kwargs = {k: getattr(args, k) for k in SPEC_ARGS[args.task] if getattr(args, k) is not None}
    spec = make_spec(args.task, **spec_kwargs)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    out = Path(args.out)
    P = spec.prompt_tokens

    if args.init:  # continue training a saved checkpoint (its architecture; the size flags are ignored)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32).to(device)
        model.set_attn_implementation("sdpa")
    else:
        model = build_model(args.arch, args.layers, args.hidden, args.heads, args.kv_heads, args.head_dim,
                            args.intermediate, max_positions=max(2048, 2 * spec.seq_len)).to(device)
    tok = build_tokenizer()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if cuda else {}),
    )

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    win_gen = torch.Generator().manual_seed(args.seed + 1)
    step_model = model
    if args.compile:
        step_model = torch.compile(model)

    # held-out set for the teacher-forced eval (fixed; the generate eval uses another seed)
    encode = {"lag": _encode, "milestone": _encode_milestone, "ledger": _encode_ledger}[args.task]
    ev_ids = torch.from_numpy(encode(*sample(np.random.default_rng(10_000 + args.seed), args.eval_problems, spec,
                                             "heldout"), spec)[0])
    batches = Batches(args.seed, args.batch_size, spec, pin=cuda, value_noise=args.value_noise)
    budget_s = args.minutes * 60
    log = {
        "command": " ".join([Path(sys.executable).name] + sys.argv) if argv is None else "train_testbed.py " + " ".join(argv),
        "args": vars(args), "task": args.task, "spec": dataclasses.asdict(spec), "params": n_params, "model_config": model.config.to_dict(),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "seq_len": spec.seq_len, "prompt_tokens": P, "loss": [], "evals": [],
    }
    print(f"model: {args.arch} {args.layers}x{args.hidden} heads {args.heads}/{args.kv_heads} head_dim {args.head_dim}, "
          f"{n_params / 1e6:.2f}M params; task: {spec}; device {log['device']}", flush=True)

    step, tokens, last_eval, stop_reason = 0, 0, time.perf_counter(), "time"
    t_loop = time.perf_counter()
    bar = tqdm(total=round(budget_s), unit="s", desc="train", dynamic_ncols=True, disable=args.smoke,
               mininterval=2.0 if sys.stderr.isatty() else 30.0)
    loss_sum, loss_n = 0.0, 0
    model.train()
    while True:
        now = time.perf_counter()
        elapsed = now - t_start
        if elapsed >= budget_s:
            break
        if args.steps is not None and step >= args.steps:
            stop_reason = "steps"
            break
        # LR: linear warm-up, then cosine over the wall-clock budget down to 5% of the peak
        frac = min(1.0, elapsed / budget_s)
        lr = args.lr * (min(1.0, (step + 1) / args.warmup)) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, exclude = batches.next()
        ids = ids.to(device, non_blocking=True)
        exclude = None if exclude is None else exclude.to(device, non_blocking=True)
        windows = draw_windows(win_gen, len(ids), args.window, args.full_frac, ids.shape[1])
        drop = page_dropout_mask(win_gen, len(ids), ids.shape[1], args.page_dropout,
                                 recent_pages=args.dropout_recent, prompt_len=P, device=device,
                                 spread=args.dropout_spread)
        with amp():
            try:
                loss = loss_fn(step_model, ids, P, windows, drop, exclude)
            except Exception as e:  # a failed compile must not cost the run
                if step_model is model:
                    raise
                print(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); continuing eager", flush=True)
                step_model = model
                loss = loss_fn(step_model, ids, P, windows, drop, exclude)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        tokens += int((ids != PAD).sum())  # host sync once per step: cheap next to a step
        loss_sum, loss_n = loss_sum + loss.detach(), loss_n + 1
        if step % 25 == 0 or step <= 3:
            lv = (loss_sum / loss_n).item()  # mean over the steps since the last entry
            loss_sum, loss_n = 0.0, 0
            dt = time.perf_counter() - t_loop
            log["loss"].append({"step": step, "t": round(time.perf_counter() - t_start, 2), "loss": lv,
                                "lr": lr, "grad_norm": float(gnorm), "tokens_per_s": tokens / dt})
            bar.set_postfix(step=step, loss=f"{lv:.4f}", tok_s=f"{tokens / dt:,.0f}")
        bar.update(min(round(time.perf_counter() - t_start), round(budget_s)) - bar.n)
        if time.perf_counter() - last_eval >= args.eval_every:
            ev = evaluate(model, ev_ids, P, device, amp, args)
            ev.update(step=step, t=round(time.perf_counter() - t_start, 2), tokens=tokens)
            log["evals"].append(ev)
            tqdm.write(f"step {step} t={ev['t']:.0f}s " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()
                                                                       if k.startswith("tf_")))
            save(model, tok, out, log)
            last_eval = time.perf_counter()
            if not args.no_early_stop and min(ev["tf_seq_acc"], ev.get("tf_seq_acc_window", 1.0)) >= args.target:
                stop_reason = "target"
                break
    bar.close()
    batches.close()
    train_s = time.perf_counter() - t_loop
    log.update(steps=step, train_seconds=train_s, train_tokens=tokens, tokens_per_s=tokens / max(train_s, 1e-9),
               stop_reason=stop_reason)
    final = evaluate(model, ev_ids, P, device, amp, args)
    final.update(step=step, t=round(time.perf_counter() - t_start, 2), tokens=tokens)
    log["evals"].append(final)
    if args.gen_problems:
        final.update(generate_eval(model, tok, spec, args.gen_problems, seed=20_000 + args.seed, device=device,
                                   batch_size=256))
    log["final"] = final
    log["total_seconds"] = time.perf_counter() - t_start
    save(model, tok, out, log)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"done: {step} steps, {tokens / 1e6:.1f}M tokens in {train_s:.0f}s ({log['tokens_per_s']:,.0f} tok/s); "
          + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items())
          + f"; saved {out} ({size / 2**20:.1f} MiB)", flush=True)
    return log


if __name__ == "__main__":
    main()
