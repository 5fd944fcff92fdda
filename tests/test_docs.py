"""The README and docs cite results files and link pages, which must exist in the repository; the
README's family table names every supported model type."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _expand(path: str) -> list[str]:
    """``a_{x,y}.md`` -> ``a_x.md``, ``a_y.md`` (the docs name file groups this way)."""
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _expand(path[:m.start()] + alt + path[m.end():])]


def _exists(path: Path) -> bool:
    return any(path.parent.glob(path.name)) if "*" in path.name else path.exists()


def cited_results(text: str) -> list[str]:
    """Results files a page names in code spans: ``h100/...``, ``h200/...``, ``sm90/...`` (under
    benchmarks/results/) or a path from ``benchmarks/results/``."""
    found = []
    for span in re.findall(r"`([^`\s]+)`", text):
        span = span.rstrip(".,;:")
        if re.match(r"(h100|h200|sm90)/", span):
            found += _expand(span)
        elif span.startswith("benchmarks/results/"):
            found += _expand(span.removeprefix("benchmarks/results/"))
    return found


def linked(text: str) -> list[str]:
    """Relative targets of markdown links and images (no URLs, no anchors)."""
    return [t for t in re.findall(r"\]\(([^)\s#]+)", text) if "://" not in t]


def test_the_helpers_find_what_the_docs_write():
    text = ("`h100/a_{x,y}_h100.md` and `sm90/b.json`, (`benchmarks/results/c.*`); `raas_flex/engine.py`; "
            "[kernels](kernels.md), ![plot](../p.png), [site](https://example.org/x.md)")
    assert cited_results(text) == ["h100/a_x_h100.md", "h100/a_y_h100.md", "sm90/b.json", "c.*"]
    assert linked(text) == ["kernels.md", "../p.png"]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_results_file_and_link_exists(page):
    text = page.read_text()
    missing = [r for r in cited_results(text) if not _exists(RESULTS / r)]
    missing += [t for t in linked(text) if not _exists((page.parent / t).resolve())]
    assert not missing, f"{page.relative_to(ROOT)} names files that are not in the repository: {missing}"


def test_the_readme_family_table_names_every_supported_model_type():
    from raas_flex import SUPPORTED_MODEL_TYPES

    section = (ROOT / "README.md").read_text().split("## Supported models", 1)[1]
    table = re.search(r"^\| family \|.*?(?=\n\n)", section, re.S | re.M).group(0)
    assert [t for t in SUPPORTED_MODEL_TYPES if f"`{t}`" not in table] == []
