"""Time the decode step under another launch plan of ``fused_step``, without editing the package.

    python benchmarks/plan_variant.py --set ROW_WRITER_MIN_SPLIT=16 -- --shapes 8/28/4 --contexts 32768 \\
        --budgets 2048 --baseline-budgets all --configs "raas;streaming" --tag plan_nowriter_8x28x4_L2048
    python benchmarks/plan_variant.py --set split=4 -- ...    # 4 attention programs a row (at most one a tile)
    python benchmarks/plan_variant.py --set "" -- ...         # the shipped plan, for the same sweep

``--script kernel_resources`` compiles the step for sm_90 under the variant instead (registers,
programs per SM and waves, no GPU needed; ``benchmarks/kernel_resources.py``).

``--set`` takes ``NAME=INT`` items: the rule constants ``kernels.step_plan`` and ``kernels.split_for``
read (``TILES_PER_PROGRAM``, ``OBSERVER_MAX_PROGRAMS_PER_SM``, ``STAGES_WIDE``, ...; not ``BLOCK_N``,
which the kernels also take), or ``split`` for a fixed number of attention programs per row. They hold
for this process only. Everything after ``--`` goes to the script; its results JSON's meta gets the settings
(``plan_variant``) and every plan the step used (``plans``).

A sweep runs the variants one after another on one GPU, the shipped plan first and last, each its
own process; docs/kernels.md ("Measured and not shipped") has the ones measured so far.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import raas_flex.kernels as kernels

# The constants the plan reads, less the tile size the kernels are compiled with.
PLAN_CONSTANTS = sorted(
    {n for f in (kernels.step_plan, kernels.split_for) for n in f.__code__.co_names if n.isupper()} - {"BLOCK_N"}
)


def parse_settings(text: str) -> dict[str, int]:
    """``"A=1,split=4"`` -> ``{"A": 1, "split": 4}``; bad names or values raise ValueError naming them."""
    settings: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or (name != "split" and name not in PLAN_CONSTANTS):
            allowed = ", ".join(["split"] + PLAN_CONSTANTS)
            raise ValueError(f"--set: {item!r} is not allowed; allowed: NAME=INT with NAME one of {allowed}")
        try:
            settings[name] = int(value)
        except ValueError:
            raise ValueError(f"--set: {name}={value!r} is not allowed; allowed: an int >= 1") from None
        if settings[name] < 1:
            raise ValueError(f"--set: {name}={value!r} is not allowed; allowed: an int >= 1")
    return settings


@contextlib.contextmanager
def plan_variant(settings: dict[str, int]):
    """Within the block ``fused_step`` plans with ``settings``; yields the dict of plans it made."""
    from raas_flex.kernels import attention

    plans: dict[tuple, kernels.StepPlan] = {}  # (rows, slots, pages, G, D, sms, bounds) -> plan
    shipped_plan, shipped_split = kernels.step_plan, kernels.split_for
    saved = {name: getattr(kernels, name) for name in settings if name != "split"}

    def recording_plan(rows, slots, pages, G, D, sms, bounds=True):
        plan = shipped_plan(rows, slots, pages, G, D, sms, bounds=bounds)
        plans[(rows, slots, pages, G, D, sms, bounds)] = plan
        return plan

    try:
        for name in saved:
            setattr(kernels, name, settings[name])
        if "split" in settings:
            kernels.split_for = lambda rows, tiles, sms: min(settings["split"], tiles)
        attention.step_plan = recording_plan  # (attention.py holds its own name for the plan function)
        yield plans
    finally:
        attention.step_plan = shipped_plan
        kernels.split_for = shipped_split
        for name, value in saved.items():
            setattr(kernels, name, value)


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", dest="settings", required=True, help="NAME=INT,... ('' for the shipped plan)")
    ap.add_argument("--script", choices=("decode_step", "kernel_resources"), default="decode_step")
    args = ap.parse_args(ours)
    settings = parse_settings(args.settings)
    sys.path.insert(0, str(Path(__file__).parent))
    import decode_step
    import kernel_resources

    script = decode_step if args.script == "decode_step" else kernel_resources

    given = script.parser().parse_args(rest)
    with plan_variant(settings) as plans:
        script.main(rest)
    if script is decode_step:
        path = decode_step.results_json(given)
    else:
        path = given.out and Path(given.out)
    made = [dict(shape=dict(zip(("rows", "slots", "pages", "G", "D", "sms", "bounds"), key)),
                 plan=dataclasses.asdict(plan)) for key, plan in plans.items()]
    for plan in made:
        print("plan:", plan)
    if path:  # (kernel_resources writes JSON only with --out)
        data = json.loads(path.read_text())
        command = (f"python benchmarks/plan_variant.py --set {','.join(f'{k}={v}' for k, v in settings.items())!r}"
                   f" --script {args.script} -- ")
        data["meta"].update(command=command + " ".join(rest), plan_variant=settings, plans=made)
        path.write_text(json.dumps(data, indent=1))
    return path


if __name__ == "__main__":
    main()
