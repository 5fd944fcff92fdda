"""Hand-fused Triton kernels for a decode step (design and measurements: docs/kernels.md).

    fused_append          one program per (sequence, KV head) row: the token's slot (first free page
                          slot, else the evictable page with the smallest key), its write, the page
                          table, key bounds, counters, the validity row flex's mask_mod reads and
                          exact flex block lists
    fused_append_observe  the same, then the RaaS observe of the step's query (Quest's page bound,
                          the top-k refresh): the flex path's one launch a step
    page_bounds           Quest's page bound of every page slot, many programs a row
    pick_pages            quest's page choice from those bounds (a bitwise search, one program a row),
                          with the validity row and block lists of the chosen pages
    quest_step            quest's step before its attention: the append under dense's rule and the
                          page bounds in one launch (many programs a row), then the pick
    fused_step            the whole raas, h2o or streaming step (append, attention, observe) in one launch, laid
                          out by :func:`step_plan` (backend="triton"); attention shares come from the
                          attention's own pass over K/V
    paged_attend          the attention over the pages quest_step chose, read through its list (quest
                          on backend="triton")

They are torch.library.triton_op ops that declare every buffer they write (mutates_args): they run
eagerly, in torch.compile(fullgraph=True) graphs and under CUDA graphs, launch a grid fixed by the
shapes, allocate nothing that grows and never synchronise with the host. Without triton this
package imports with HAS_TRITON False; with TRITON_INTERPRET=1 set before import the kernels also
run on CPU tensors through Triton's interpreter (the CPU tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs usually lack it
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False


FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Rule constants (measurements behind each: docs/kernels.md).
WARPS = 4  # warps per program of every kernel.
LISTS_IN_REGS_MAX = 8192  # block occupancy from registers up to this many (block, page) pairs, else read back.
APPEND_BOUND_ELEMS = 8192  # key-bound elements per chunk of the append kernel's observe.
BOUND_PAGES = 64  # pages per program of the bounds kernel and of quest_step's append + bounds kernel.
BLOCK_N = 64  # slots per K/V tile of fused_step.
TILES_PER_PROGRAM = 16  # a row gets more attention programs when one would run more tiles than this.
CPU_SPLIT = 4  # attention programs per row wanted where there is no SM count (the interpreter).
SHARE_BOUND_ELEMS = 2048  # key-bound elements per chunk of an attention program's (element-wise) bounds.
OBSERVER_BOUND_ELEMS = 16384  # the observer bounds its whole row in one matrix product up to this many elements,
OBSERVER_CHUNK_ELEMS = 8192  # else in chunks of this many.
OBSERVER_MAX_PROGRAMS_PER_SM = 5  # the observer is on while rows x (split + 1) fits this many programs per SM.
OBSERVER_MIN_SPLIT = 2  # with the observer, at least this many attention programs per row.
ROW_WRITER_MIN_SPLIT = 8  # with the observer, a writer program per row from this many attention programs.
COMBINE_ONLINE_MIN_SPLIT = 4  # with the observer, the online combine from this many attention programs.
OBSERVERS_LAST_MAX_PROGRAMS_PER_SM = 3  # observers take the last grid indices while the grid fits this per SM.
STAGES_WIDE = 3  # K/V pipeline stages for wide steps (rows >= STAGES_WIDE_ROWS of >= STAGES_WIDE_G heads), else 2.
STAGES_WIDE_ROWS = 128  # (see STAGES_WIDE)
STAGES_WIDE_G = 7  # (see STAGES_WIDE)
SHARE_COMBINE_ELEMS = 4096  # partial page sums per chunk of the combine of fused_step's attention shares.


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET set before it loads)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernels cannot run on this device with this K/V dtype (None if they can). Which policies
    they serve is the policy's to say (``Policy.append_code``, ``Policy.fused_observe``,
    ``Policy.step_observe``)."""
    if not HAS_TRITON:
        return "triton is not installed"
    dev = torch.device(device)
    if dev.type != "cuda" and not (interpreting() and dev.type == "cpu"):
        return f"device={dev.type!r} (the kernels need a CUDA device)"
    if dtype not in FUSED_DTYPES:
        allowed = ", ".join(str(t).removeprefix("torch.") for t in FUSED_DTYPES)
        return f"dtype={str(dtype).removeprefix('torch.')} (fused kernels serve: {allowed})"
    return None


def device_sms(device: torch.device) -> int | None:
    """The SM count of a CUDA device; None elsewhere (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def lists_in_regs(blocks: int, pages: int) -> bool:
    """Whether the block lists' occupancy is counted in registers (else read back from the valid row)."""
    return _pow2_ceil(blocks) * _pow2_ceil(pages) <= LISTS_IN_REGS_MAX


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def split_for(rows: int, tiles: int, sms: int | None) -> int:
    """Attention programs per row: a power of two, at most one per tile; about two per SM over all
    ``rows`` and at least one per TILES_PER_PROGRAM tiles (``sms`` None: CPU_SPLIT)."""
    want = CPU_SPLIT if sms is None else max(1, 2 * sms // rows, -(-tiles // TILES_PER_PROGRAM))
    return _pow2_floor(min(want, tiles))


@dataclass(frozen=True)
class StepPlan:
    """fused_step's launch: grid (rows, programs) and the kernel's constexprs."""

    split: int  # attention programs per row
    tiles: int  # K/V tiles of BLOCK_N slots per attention program
    pages: int  # pages each attention program bounds (without the observer)
    bp: int  # pages a bound loop covers (a power of two)
    bpc: int  # pages per chunk of the bound loop
    dot: bool  # page bounds as matrix products (the observer's), else element-wise
    observer: bool  # one program per row bounds the whole row and picks the top-k set
    writer: bool  # one more program per row makes the row writes beside the observer (bounds only)
    lean: bool  # row writes store only the changed page of the validity row
    lazy: bool  # the page choice only when the token opens a page
    online: bool  # the row's combine merges the parts one after another
    observers_last: bool  # the observer and writer take the row's last grid indices
    stages: int  # software-pipeline stages of the K/V tile loop

    @property
    def programs(self) -> int:
        """Programs per row (the grid's second dimension)."""
        return self.split + self.observer + self.writer


def step_plan(rows: int, slots: int, pages: int, G: int, D: int, sms: int | None, bounds: bool = True) -> StepPlan:
    """fused_step's plan for ``rows`` (sequence, KV head) rows of ``slots`` slots in ``pages`` pages,
    G query heads per KV head, head_dim D, on a GPU of ``sms`` SMs (None: the CPU interpreter).
    ``bounds``: the observe computes Quest's page bounds (raas default); without them (attention
    shares, or streaming's no observe) the observer program has only the row writes to make and
    there is no writer."""
    for name, value in (("rows", rows), ("slots", slots), ("pages", pages), ("G", G), ("D", D)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"step_plan: {name}={value!r} is not allowed; allowed: an int >= 1")
    if sms is not None and (not isinstance(sms, int) or isinstance(sms, bool) or sms < 1):
        raise ValueError(f"step_plan: sms={sms!r} is not allowed; allowed: None or an int >= 1")
    if not isinstance(bounds, bool):
        raise TypeError(f"step_plan: bounds must be True or False, got {bounds!r}")
    tiles = -(-slots // BLOCK_N)
    split = split_for(rows, tiles, sms)
    observer = sms is None or rows * (split + 1) <= OBSERVER_MAX_PROGRAMS_PER_SM * sms
    if observer and split < OBSERVER_MIN_SPLIT:
        split = _pow2_floor(min(OBSERVER_MIN_SPLIT, tiles))
    writer = observer and split >= ROW_WRITER_MIN_SPLIT and bounds
    share = -(-pages // split)
    bp = _pow2_ceil(pages if observer else share)
    if observer:
        elems = OBSERVER_BOUND_ELEMS if bp * D <= OBSERVER_BOUND_ELEMS else OBSERVER_CHUNK_ELEMS
    else:
        elems = SHARE_BOUND_ELEMS
    bpc = min(bp, _pow2_floor(max(1, elems // D)))
    if observer:  # (a matrix product needs 16 pages)
        bp, bpc = max(bp, 16), max(bpc, 16)
    programs = split + observer + writer
    return StepPlan(
        split=split, tiles=-(-tiles // split), pages=share, bp=bp, bpc=bpc, dot=observer, observer=observer,
        writer=writer, lean=writer or not observer, lazy=observer,
        online=observer and split >= COMBINE_ONLINE_MIN_SPLIT,
        observers_last=observer and (sms is None or rows * programs <= OBSERVERS_LAST_MAX_PROGRAMS_PER_SM * sms),
        stages=STAGES_WIDE if G >= STAGES_WIDE_G and rows >= STAGES_WIDE_ROWS else 2,
    )


if HAS_TRITON:
    from .attention import fused_step, paged_attend  # noqa: E402
    from .bookkeeping import fused_append, fused_append_observe, page_bounds, pick_pages, quest_step  # noqa: E402
