"""Accuracy and output length vs KV budget for every policy, on any transformers causal LM.

    # the reasoning testbed (raas_flex.testbed): 200 held-out problems, budgets 1/8, 1/4, 1/2 of the chain
    python benchmarks/accuracy.py --model models/testbed --testbed 200 --budgets 0.125,0.25,0.5 --dtype float32
    # a real reasoning model on a JSONL of {"question", "answer"} (GSM8K / MATH500 / AIME style)
    python benchmarks/accuracy.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --problems gsm8k.jsonl \\
        --budgets 512,1024,2048 --max-new-tokens 8192 --batch-size 16

For each (policy, budget): exact-answer accuracy, mean and max output length (tokens up to and
including EOS; evicting what the chain still needs makes outputs longer), decode time and tokens/s,
and the KV memory that raas_flex allocated (``raas_flex.stats``). Budgets are token counts (``256``)
or fractions of the mean dense output length (``0.25``: dense runs first and sets the scale); each is
rounded to a multiple of the page size. A budget a policy cannot run (raas keeps the prompt's pages,
so the prompt must fit) gives a row with the error instead of a number. Greedy by default.

Writes ``<out>/<name>.json`` (every row, the per-problem answers and the run's command, versions
and device), ``<name>.md`` (a table) and ``<name>.png`` (accuracy and mean output length vs budget,
one line per policy, dense as a horizontal line).

Answers: :func:`extract_answer` takes the last ``\\boxed{...}`` (nested braces), else the testbed's
``A:`` marker, else the last number in the text; :func:`normalize_answer` makes ``1,000``,
``1000.0`` and ``\\frac{2}{4}``/``1/2`` compare equal to ``1000`` and ``0.5``. On testbed problems
(JSONL rows with a ``cot``) each wrong answer is also classified by the first line that differs from
the reference chain (:func:`diagnose`): a wrong table read ("table": a phoenix token was lost), a
wrong lagged read ("lag": a milestone was lost), a copy or arithmetic slip, or a chain that did not
stop where it should ("stop") or stopped early ("early_stop"); milestone (``--milestone N``) and ledger
(``--ledger N``) problems have their own kinds (:func:`diagnose_milestone`, :func:`diagnose_ledger`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import raas_flex  # noqa: E402
from raas_flex.config import parse_options, parse_spec  # noqa: E402
from raas_flex import ledger, testbed  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT_FORMATS = ("auto", "raw", "chat")
COMPILE_MODES = ("auto", "off")
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


# -- answers -------------------------------------------------------------------------------------------
def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, else None."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[m.end():i - 1].strip()
    return None


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_answer(text: str) -> str | None:
    """The final answer in a model's output: the last ``\\boxed{...}``, else the testbed's ``A:``
    marker, else the last number (``1,234``, ``-3.5``, ``2/3``); None when there is none."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    marked = testbed.parse_answer(text)
    if marked is not None:
        return marked
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _fraction(s: str) -> Fraction | None:
    s = s.replace(",", "").replace(" ", "")
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)\\[dt]?frac(\d)(\d)", s)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        if den == 0:
            return None
        return Fraction(num, den) * (-1 if m.group(1) else 1)
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    if m:
        return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s):
        return Fraction(s)
    return None


def normalize_answer(ans) -> str | None:
    """Canonical form for comparison: numbers (commas, ``$``, ``%``, trailing ``.0``, simple
    fractions and ``\\frac{a}{b}``) become a reduced rational (``"3"``, ``"-1/2"``); any other
    answer loses spaces, ``\\text{}``/``\\left``/``\\right``, ``$`` and a trailing period."""
    if ans is None:
        return None
    s = str(ans).strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(left|right|,|!|;|\s)", "", s)
    s = s.replace("$", "").replace("\\%", "").replace("%", "").replace("^\\circ", "").replace("^{\\circ}", "")
    s = s.strip().rstrip(".").strip()
    if s.startswith("\\dfrac") or s.startswith("\\tfrac"):
        s = "\\frac" + s[6:]
    f = _fraction(s)
    if f is not None:
        return str(f)
    return re.sub(r"\s+", "", s) or None


def answers_match(pred, gold) -> bool:
    p, g = normalize_answer(pred), normalize_answer(gold)
    return p is not None and p == g


# -- testbed diagnosis -----------------------------------------------------------------------------------
DIAGNOSES = ("correct_chain", "table", "lag", "copy", "arith", "format", "stop", "early_stop")


def diagnose(generated: str, reference_cot: str, spec: testbed.TaskSpec = testbed.DEFAULT_SPEC) -> str:
    """Where a testbed chain first went wrong (one of ``DIAGNOSES``), comparing line by line with the
    reference chain: the looked-up ``b`` of a table line ("table"), of a lagged line ("lag"), the
    copied ``a`` ("copy"), the sum ("arith"), the line's layout ("format"), running past the last line
    ("stop") or answering before it ("early_stop")."""
    ref = reference_cot.split("\n")
    gen = generated.split("\n")
    for i, r in enumerate(ref):
        g = gen[i] if i < len(gen) else ""
        if g == r:
            continue
        rm = re.fullmatch(r"(\d{3}):(\d)\+(\d)=(\d)", r)
        gm = re.fullmatch(r"(\d{3}):(\d)\+(\d)=(\d)", g)
        if rm is None:  # the reference's answer line: the generated chain went on or changed the answer
            return "stop" if gm is not None else "format"
        if gm is None:
            return "early_stop" if g.startswith(testbed.ANSWER_MARK) else "format"
        if gm.group(1) != rm.group(1):
            return "format"
        if gm.group(2) != rm.group(2):
            return "copy"
        if gm.group(3) != rm.group(3):
            return "table" if spec.reads_table(int(rm.group(1))) else "lag"
        return "arith"
    return "correct_chain"


def _first_wrong_line(generated: str, reference_cot: str, line: str):
    """The first line of ``generated`` that differs from the reference chain's: its and the
    reference's matches of the line pattern ``line``, or the diagnosis when one is already plain:
    "correct_chain" (no line differs), "stop" (a line past the reference's last), "early_stop" (the
    answer before it) or "format" (a line that is not a chain line)."""
    ref, gen = reference_cot.split("\n"), generated.split("\n")
    for i, r in enumerate(ref):
        g = gen[i] if i < len(gen) else ""
        if g == r:
            continue
        rm, gm = re.fullmatch(line, r), re.fullmatch(line, g)
        if rm is None:
            return "stop" if gm is not None else "format"
        if gm is None:
            return "early_stop" if g.startswith(testbed.ANSWER_MARK) else "format"
        return rm, gm
    return "correct_chain"


MILESTONE_DIAGNOSES = ("correct_chain", "fact", "value", "format", "stop", "early_stop")


def diagnose_milestone(generated: str, reference_cot: str, spec: testbed.MilestoneSpec = testbed.MILESTONE_SPEC) -> str:
    """Where a milestone-task chain first went wrong (one of ``MILESTONE_DIAGNOSES``): a wrong copy of a
    question fact ("fact"), a wrong line value or fact key, both computed from the line's operands
    ("value"), a line's layout ("format"), running past the last line ("stop") or answering before it
    ("early_stop")."""
    first = _first_wrong_line(generated, reference_cot, r"(\d{3}[:!])(\d{3})\+(q\d:\d|\d{3})=(\d)")
    if isinstance(first, str):
        return first
    rm, gm = first
    if gm.group(1, 2) != rm.group(1, 2) or gm.group(3)[0] != rm.group(3)[0]:
        return "format"
    if gm.group(3) != rm.group(3) and rm.group(3).startswith("q"):  # "qK:F": key K is the previous value
        return "value" if gm.group(3)[:2] != rm.group(3)[:2] else "fact"
    return "value"


LEDGER_DIAGNOSES = ("correct_chain", "fact", "copy", "value", "ledger", "format", "stop", "early_stop")


def diagnose_ledger(generated: str, reference_cot: str) -> str:
    """Where a ledger-task chain (:mod:`raas_flex.ledger`) first went wrong (one of ``LEDGER_DIAGNOSES``):
    a wrong copy of a question fact ("fact"), a wrong copy of the previous value (the multiplier or a fact
    key: "copy"), a wrong line value, with its multiplier right (the entry read by key, or the product:
    "value"), a wrong ledger line (its copies of the last ten values: "ledger"), a line's layout
    ("format"), running past the last line ("stop") or answering before it ("early_stop")."""
    first = _first_wrong_line(generated, reference_cot,
                              r"(\d{3}):(\d{3})([a-j])\*(\d|q\d:\d)=(\d)|(\d{3})!((?:[a-j]\d){10})")
    if isinstance(first, str):
        return first
    rm, gm = first
    if rm.group(6) or gm.group(6):  # a ledger line: same label and keys, some copied value differs
        same = rm.group(6) == gm.group(6) and rm.group(7)[::2] == (gm.group(7) or "")[::2]
        return "ledger" if same else "format"
    if gm.group(1, 2, 3) != rm.group(1, 2, 3) or gm.group(4)[0].isdigit() != rm.group(4)[0].isdigit():
        return "format"
    x, rx = gm.group(4), rm.group(4)
    if x != rx:  # "qK:F": K copies the previous value, F the question's fact; a plain x copies the value
        return "fact" if rx.startswith("q") and x[:2] == rx[:2] else "copy"
    return "value"


# -- inputs ----------------------------------------------------------------------------------------------
def load_problems(path) -> list[dict]:
    """JSONL rows with "question" and "answer" (other keys kept)."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise ValueError(f"{path}:{n}: each line must be a JSON object with 'question' and 'answer'")
            row["answer"] = str(row["answer"])
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no problems")
    return rows


def parse_budgets(text: str) -> list:
    """``"0.125,0.25,512,+0.25"`` -> [0.125, 0.25, 512, "+0.25"]: values in (0, 1] are fractions of the
    mean dense output length, integers > 1 are token counts, ``+f`` is the longest prompt's pages plus
    the fraction ``f`` (the prompt stays pinned: the fraction is what the chain gets)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        plus = part.startswith("+")
        try:
            value = float(part[1:] if plus else part)
        except ValueError:
            raise ValueError(f"--budgets: {part!r} is neither a token count, a fraction in (0, 1] nor +fraction") from None
        if plus and 0 < value <= 1:
            out.append(f"+{value}")
        elif not plus and 0 < value <= 1:
            out.append(value)
        elif not plus and value > 1 and value == int(value):
            out.append(int(value))
        else:
            raise ValueError(f"--budgets: {part!r} must be a fraction in (0, 1], +fraction or a whole token count > 1")
    return out


def resolve_budget(budget, reference_length: float | None, page_size: int = 16, prompt_tokens: int | None = None) -> int:
    """Token budget for one entry of :func:`parse_budgets`: fractions scale ``reference_length``
    (``+f``: added to ``prompt_tokens`` rounded up to whole pages); the result is rounded to the
    nearest multiple of ``page_size``, at least two pages."""
    base = 0
    if isinstance(budget, str):
        if prompt_tokens is None:
            raise ValueError(f"budget {budget!r} needs the prompt length")
        base, budget = -(-prompt_tokens // page_size) * page_size, float(budget[1:])
    if isinstance(budget, float):
        if reference_length is None:
            raise ValueError("a fractional budget needs the mean dense output length (run the dense policy)")
        tokens = budget * reference_length
    else:
        tokens = budget
    return max(2 * page_size, base + int(round(tokens / page_size)) * page_size)


def parse_policies(text: str) -> list[str]:
    """Configurations to run, each named by its user-facing options: ``"dense,raas,h2o"`` (plain
    names, comma-separated) or ``"dense;raas;raas:importance=attention,refresh=threshold"``
    (``;``-separated when any configuration carries options). Each is checked by
    :func:`raas_flex.config.parse_spec`."""
    text = str(text)
    if ";" in text:
        out = [p.strip() for p in text.split(";") if p.strip()]
    else:
        out = [p.strip() for p in text.split(",") if p.strip()]
        if any(":" in p for p in out) and len(out) > 1:
            raise ValueError(f"--policies {text!r}: separate configurations that carry options with ';' "
                             "(e.g. 'dense;raas:importance=attention,refresh=threshold')")
    if not out:
        raise ValueError(f"--policies {text!r} names no configuration")
    for p in out:
        try:
            parse_spec(p)
        except ValueError as e:
            raise ValueError(f"--policies: {e}") from None
    return out


# -- generation ------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_prompts(tok, problems, prompt_format: str, instruction: str) -> list[list[int]]:
    use_chat = prompt_format == "chat" or (prompt_format == "auto" and getattr(tok, "chat_template", None))
    prompts = []
    for p in problems:
        if use_chat:
            text = tok.apply_chat_template(
                [{"role": "user", "content": f"{p['question']}\n{instruction}".strip()}],
                tokenize=False, add_generation_prompt=True,
            )
            prompts.append(tok(text, add_special_tokens=False).input_ids)
        else:
            prompts.append(tok(p["question"]).input_ids)
    return prompts


def run_config(model, tok, prompts, problems, policy: str, budget: int, args, bar, spec) -> dict:
    """Generate every problem under (policy, budget); one row of results."""
    device = model.device
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos_ids))
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=pad)
    if args.sample:
        gen.update(temperature=args.temperature, top_p=args.top_p)
    if args.compile == "off":
        gen["disable_compile"] = True
    name, spec_options = parse_spec(policy)
    options = dict(page_size=args.page_size, **parse_options(args.option), **spec_options)
    row = {"policy": policy, "budget": budget, "problems": len(problems)}
    if args.option:
        row["options"] = parse_options(args.option)
    results, seconds, kv_per_seq, evictions = [], 0.0, 0, 0
    try:
        with raas_flex.patched(model, budget, policy=name, **options):
            for i in range(0, len(prompts), args.batch_size):
                chunk = prompts[i:i + args.batch_size]
                width = max(map(len, chunk))
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, p in enumerate(chunk):  # left padding
                    ids[j, width - len(p):] = torch.tensor(p)
                    mask[j, width - len(p):] = 1
                ids, mask = ids.to(device), mask.to(device)
                if args.sample:
                    torch.manual_seed(args.seed + i)
                _sync(device)
                t0 = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=mask, **gen)
                _sync(device)
                seconds += time.perf_counter() - t0
                st = raas_flex.stats(model)
                kv_per_seq = max(kv_per_seq, st["kv_bytes"] // st["batch_size"])
                evictions += st["evictions"]
                for j, new in enumerate(out[:, width:].tolist()):
                    stop = next((k for k, t in enumerate(new) if t in eos_ids), None)
                    length = stop + 1 if stop is not None else len(new)
                    text = tok.decode(new[:length], skip_special_tokens=True)
                    prob = problems[i + j]
                    pred = extract_answer(text)
                    res = {"pred": pred, "gold": prob["answer"], "correct": answers_match(pred, prob["answer"]),
                           "length": length, "stopped": stop is not None, "tokens": new[:length]}
                    if "cot" in prob:
                        res["diagnosis"] = (diagnose_ledger(text, prob["cot"]) if isinstance(spec, ledger.LedgerSpec)
                                            else diagnose_milestone(text, prob["cot"], spec)
                                            if isinstance(spec, testbed.MilestoneSpec) else diagnose(text, prob["cot"], spec))
                    if args.save_text:
                        res["text"] = text
                    results.append(res)
                bar.update(len(chunk))
    except (ValueError, RuntimeError) as e:
        bar.update(len(prompts) - len(results))
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        return row
    lengths = [r["length"] for r in results]
    n_tokens = sum(lengths)
    row.update(
        accuracy=sum(r["correct"] for r in results) / len(results),
        mean_length=sum(lengths) / len(lengths), max_length=max(lengths),
        stopped=sum(r["stopped"] for r in results) / len(results),
        decode_seconds=seconds, tokens_per_s=n_tokens / seconds if seconds > 0 else None,
        kv_bytes_per_seq=int(kv_per_seq), evictions=int(evictions),
    )
    if any("diagnosis" in r for r in results):
        kinds = (LEDGER_DIAGNOSES if isinstance(spec, ledger.LedgerSpec)
                 else MILESTONE_DIAGNOSES if isinstance(spec, testbed.MilestoneSpec) else DIAGNOSES)
        row["diagnosis"] = {d: sum(r.get("diagnosis") == d for r in results) for d in kinds}
    row["results"] = results
    return row


def compare(results: list[dict], reference: list[dict]) -> dict:
    """``results`` against ``reference`` (two rows' per-problem results on the same problems, each with
    ``pred`` and ``tokens``): ``agreement`` (share of answers equal), ``identical`` (share of outputs
    token for token equal), ``mean_first_departure`` (mean index of the first generated token that
    differs, over the outputs that differ) and ``first_departures`` (per problem, None where equal)."""
    if len(results) != len(reference):
        raise ValueError(f"results: {len(results)} problems against a reference of {len(reference)}")
    firsts, agree = [], 0
    for x, d in zip(results, reference):
        agree += answers_match(x["pred"], d["pred"]) or (x["pred"] is None and d["pred"] is None)
        a, b = x["tokens"], d["tokens"]
        first = next((i for i, (s, t) in enumerate(zip(a, b)) if s != t), None)
        firsts.append(min(len(a), len(b)) if first is None and len(a) != len(b) else first)
    departures = [f for f in firsts if f is not None]
    return {"agreement": agree / len(results), "identical": 1 - len(departures) / len(results),
            "mean_first_departure": sum(departures) / len(departures) if departures else None,
            "first_departures": firsts}


def compare_with_dense(rows: list[dict], keep_tokens: bool = False) -> None:
    """Per sparse row, :func:`compare` against the dense row's outputs on the same problems
    (``agreement``, ``identical``, ``mean_first_departure`` on the row, ``first_departure`` on each
    result). Token lists stay only in the dense row (and everywhere with ``keep_tokens``)."""
    dense = next((r for r in rows if r["policy"] == "dense" and "results" in r), None)
    for r in rows:
        if "results" not in r:
            continue
        if dense is not None and r is not dense and all("tokens" in x for x in r["results"]):  # resumed: compared
            c = compare(r["results"], dense["results"])
            for x, first in zip(r["results"], c.pop("first_departures")):
                x["first_departure"] = first
            r.update(c)
        if not keep_tokens and r is not dense:
            for x in r["results"]:
                x.pop("tokens", None)


# -- reports ---------------------------------------------------------------------------------------------
def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    ref = report.get("reference_length")
    lines = [
        f"Model `{report['model']}`, {report['problems']} problems ({report['source']}), "
        f"{'sampling' if report['generation']['sample'] else 'greedy'}, {report['dtype']}, {report['device']}"
        + (f"; mean dense output {ref:.0f} tokens" if ref else "") + ".",
        "",
        "| policy | budget | budget / dense length | accuracy | answer = dense | output = dense | mean length | max length "
        "| stopped | decode s | tok/s | KV MiB / seq | first error (testbed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        frac = f"{r['budget'] / ref:.3f}" if ref and r["policy"] != "dense" else "-"
        if isinstance(r.get("budget_requested"), str):  # +fraction: the prompt's pages plus that share of the chain
            frac = f"prompt {r['budget_requested']}"
        budget = "all" if r["policy"] == "dense" else str(r["budget"])
        if "error" in r:
            lines.append(f"| {r['policy']} | {budget} | {frac} | error: {r['error'][:120]} |  |  |  |  |  |  |  |  |  |")
            continue
        diag = ", ".join(f"{k} {v}" for k, v in r.get("diagnosis", {}).items() if v and k != "correct_chain") or "-"
        lines.append(
            f"| {r['policy']} | {budget} | {frac} | {r['accuracy']:.3f} | {_fmt(r.get('agreement'), '.2f')} "
            f"| {_fmt(r.get('identical'), '.2f')} | {r['mean_length']:.0f} | {r['max_length']} "
            f"| {r['stopped']:.2f} | {r['decode_seconds']:.1f} | {_fmt(r['tokens_per_s'], ',.0f')} "
            f"| {r['kv_bytes_per_seq'] / 2**20:.3f} | {diag} |"
        )
    lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = [r for r in report["rows"] if "error" not in r]
    dense = next((r for r in rows if r["policy"] == "dense"), None)
    for ax, key, label in ((axes[0], "accuracy", "exact-answer accuracy"), (axes[1], "mean_length", "mean output tokens")):
        for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "dense"):
            pts = sorted((r["budget"], r[key]) for r in rows if r["policy"] == policy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        if dense is not None:
            ax.axhline(dense[key], color="black", linestyle="--", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV budget (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend()
    fig.suptitle(f"{Path(str(report['model'])).name}: {report['problems']} problems ({report['source']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="hub id or local path of a causal LM, or a .gguf file (benchmarks/fetch_gguf.py)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--problems", help='JSONL with {"question", "answer"} per line')
    src.add_argument("--testbed", type=int, metavar="N", help="N held-out raas_flex.testbed problems (lag task)")
    src.add_argument("--milestone", type=int, metavar="N", help="N held-out milestone-task problems (docs/testbed.md)")
    src.add_argument("--ledger", type=int, metavar="N", help="N held-out ledger-task problems (docs/testbed.md)")
    ap.add_argument("--testbed-seed", type=int, default=0)
    ap.add_argument("--testbed-min-lines", type=int, default=None)
    ap.add_argument("--testbed-max-lines", type=int, default=None)
    ap.add_argument("--testbed-lag", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="first N problems of --problems")
    ap.add_argument("--policies", default="dense,raas,quest,h2o,streaming")
    ap.add_argument("--budgets", default="0.125,0.25,0.5",
                    help="comma list: token counts, fractions in (0,1] of the mean dense output length, or +fraction "
                         "(the longest prompt's pages plus that fraction)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra RaaSConfig option for every policy (repeatable), e.g. --option refresh_ratio=0.25")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=1,
                    help="worker processes sharing the device, each with its own model copy (decoding a small "
                         "model is launch-bound, so several processes fill one GPU); the dense reference runs first")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="default: 1.25x the longest testbed chain, else 4096")
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-format", default="auto", choices=PROMPT_FORMATS,
                    help="chat: the tokenizer's chat template with --instruction; raw: the question as is; "
                         "auto: chat when the tokenizer has a template")
    ap.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--compile", default="auto", choices=COMPILE_MODES,
                    help="auto: generate compiles the decode step on CUDA (pays off on long generations); "
                         "off: eager steps (no compile per policy and budget)")
    ap.add_argument("--save-text", action="store_true", help="keep every generated text in the JSON")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="accuracy", help="file stem of the JSON / markdown / PNG")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an earlier run under the same --out/--name (same model, problems and "
                         "generation settings) and run only the missing (policy, budget) pairs")
    args = ap.parse_args(argv)
    for name in ("batch_size", "page_size", "jobs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("testbed", "milestone", "ledger"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    args.policy_list = parse_policies(args.policies)
    args.budget_list = parse_budgets(args.budgets)
    return args


def load_problems_for(args):
    """The problems ``args`` name: (problems, task spec, source description, default max new tokens)."""
    spec = testbed.DEFAULT_SPEC
    if args.testbed is not None:
        overrides = {k: getattr(args, f"testbed_{k}") for k in ("min_lines", "max_lines", "lag")
                     if getattr(args, f"testbed_{k}") is not None}
        spec = testbed.TaskSpec(**overrides)
        problems = [p.to_json() for p in testbed.dataset(args.testbed, seed=args.testbed_seed, spec=spec)]
        source = f"testbed held-out, seed {args.testbed_seed}, {spec.min_lines}-{spec.max_lines} lines, lag {spec.lag}"
        return problems, spec, source, int(1.25 * (spec.cot_tokens(spec.max_lines) + 1))
    if args.milestone is not None:
        spec = testbed.MILESTONE_SPEC
        problems = [p.to_json() for p in testbed.milestone_dataset(args.milestone, seed=args.testbed_seed, spec=spec)]
        source = f"milestone task held-out, seed {args.testbed_seed}, {spec.min_lines}-{spec.max_lines} lines"
        return problems, spec, source, int(1.25 * (spec.cot_tokens(spec.max_lines) + 1))
    if args.ledger is not None:
        spec = ledger.LEDGER_SPEC
        problems = [p.to_json() for p in ledger.ledger_dataset(args.ledger, seed=args.testbed_seed, spec=spec)]
        source = f"ledger task held-out, seed {args.testbed_seed}, {spec.min_lines}-{spec.max_lines} lines"
        return problems, spec, source, int(1.25 * (spec.cot_tokens(spec.max_lines) + 1))
    return load_problems(args.problems)[: args.limit], spec, Path(args.problems).name, 4096


def load_model(args):
    """(tokenizer, model in eval mode on the run's device and dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if str(args.model).endswith(".gguf"):  # a llama.cpp checkpoint (benchmarks/fetch_gguf.py), dequantized
        from benchmarks.fetch_gguf import load_gguf

        model, tok = load_gguf(args.model, dtype=dtype)
        model = model.to(device)
    else:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tok.eos_token_id
    return tok, model


_WORKER: dict = {}


def _init_worker(args) -> None:
    """A ``--jobs`` worker process: its own copy of the model and the problems."""
    problems, spec, _, _ = load_problems_for(args)
    tok, model = load_model(args)
    _WORKER.update(args=args, problems=problems, spec=spec, tok=tok, model=model,
                   prompts=build_prompts(tok, problems, args.prompt_format, args.instruction))


def _run_in_worker(policy: str, budget: int) -> dict:
    w = _WORKER
    with tqdm(disable=True) as quiet:
        return run_config(w["model"], w["tok"], w["prompts"], w["problems"], policy, budget, w["args"], quiet, w["spec"])


RUN_KEYS = ("model", "source", "problems", "dtype", "generation", "page_size", "mean_prompt_tokens")


def resumed_rows(path: Path, report: dict) -> dict:
    """``--resume``: the rows without an error of an earlier run written to ``path`` (JSON), by
    (policy, budget); {} when there is none. The earlier run must have the same model, problems,
    generation settings and page size, else ValueError naming what differs."""
    if not path.exists():
        return {}
    prev = json.loads(path.read_text())
    changed = [k for k in RUN_KEYS if k != "generation" and prev.get(k) != report[k]]
    gen = {k: v for k, v in report["generation"].items() if k != "jobs"}
    if {k: v for k, v in prev.get("generation", {}).items() if k != "jobs"} != gen:
        changed.append("generation")
    if changed:
        raise ValueError(f"--resume: {path} is a run with other {', '.join(changed)}; use another --name or drop --resume")
    return {(r["policy"], r["budget"]): r for r in prev.get("rows", []) if "error" not in r}


def main(argv=None) -> dict:
    args = parse_args(argv)
    problems, spec, source, default_new = load_problems_for(args)
    args.max_new_tokens = args.max_new_tokens or default_new
    tok, model = load_model(args)
    device, dtype = model.device, model.dtype
    prompts = build_prompts(tok, problems, args.prompt_format, args.instruction)

    needs_dense = "dense" in args.policy_list or any(not isinstance(b, int) for b in args.budget_list)
    sparse = [p for p in args.policy_list if p != "dense"]
    n_configs = int(needs_dense) + len(sparse) * len(args.budget_list)
    report = {
        "command": " ".join(["python", "benchmarks/accuracy.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "model": Path(args.model).stem if str(args.model).endswith(".gguf") else args.model, "source": source, "problems": len(problems), "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"),
        "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "generation": {"sample": args.sample, "temperature": args.temperature if args.sample else None,
                       "top_p": args.top_p if args.sample else None, "max_new_tokens": args.max_new_tokens,
                       "batch_size": args.batch_size, "compile": args.compile, "jobs": args.jobs},
        "page_size": args.page_size, "budgets_requested": args.budget_list, "policies": args.policy_list,
        "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
        "max_prompt_tokens": max(map(len, prompts)),
        "spec": (dataclasses.asdict(spec) if any(getattr(args, k) is not None for k in ("testbed", "milestone", "ledger"))
                 else None),
        "reference_length": None, "rows": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    done = resumed_rows(out / f"{args.name}.json", report) if args.resume else {}
    with tqdm(total=n_configs * len(prompts), unit="problem", desc="accuracy", dynamic_ncols=True,
              mininterval=2.0 if sys.stderr.isatty() else 30.0) as bar:
        if needs_dense:
            bar.set_postfix_str("dense")
            row = done.get(("dense", 2 * args.page_size))
            if row is None:
                row = run_config(model, tok, prompts, problems, "dense", 2 * args.page_size, args, bar, spec)
            else:
                bar.update(len(prompts))
            report["rows"].append(row)
            if "error" in row:
                raise RuntimeError(f"the dense reference failed: {row['error']}")
            report["reference_length"] = row["mean_length"]
        todo = [(policy, b, resolve_budget(b, report["reference_length"], args.page_size, report["max_prompt_tokens"]))
                for policy in sparse for b in args.budget_list]

        def record(i: int, row: dict) -> None:
            policy, requested, budget = todo[i]
            row["budget_requested"] = requested
            rows[i] = row
            summary = ("error" if "error" in row else
                       f"acc {row['accuracy']:.3f} len {row['mean_length']:.0f} {row['decode_seconds']:.1f}s")
            tqdm.write(f"{policy} budget {budget}: {summary}")
            # the rows so far, so that a run stopped from outside keeps what it measured
            partial = dict(report, rows=report["rows"] + [r for r in rows if r is not None], complete=False)
            (out / f"{args.name}.json").write_text(json.dumps(partial, indent=1))

        rows: list = [None] * len(todo)
        for i, (policy, _, budget) in enumerate(todo):
            if (policy, budget) in done:
                rows[i] = done[(policy, budget)]
                bar.update(len(prompts))
        if args.jobs == 1:
            for i, (policy, _, budget) in enumerate(todo):
                if rows[i] is None:
                    bar.set_postfix_str(f"{policy} {budget}")
                    record(i, run_config(model, tok, prompts, problems, policy, budget, args, bar, spec))
        else:  # decoding a small model is launch-bound: several processes share one device
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(args,)) as pool:
                futures = {pool.submit(_run_in_worker, policy, budget): i for i, (policy, _, budget) in enumerate(todo)
                           if rows[i] is None}
                for f in as_completed(futures):
                    record(futures[f], f.result())
                    bar.update(len(prompts))
        report["rows"] += rows
    compare_with_dense(report["rows"], keep_tokens=args.save_text)
    report["total_seconds"] = time.perf_counter() - t_all
    report["complete"] = True
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{args.name}.md").write_text(markdown(report))
    try:
        plot(report, out / f"{args.name}.png")
    except ImportError as e:  # the JSON and markdown are written; the plot needs matplotlib (extra "plot")
        print(f"no plot ({e}); pip install matplotlib, then re-plot from {args.name}.json with accuracy.plot")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
