"""The README's examples run as written: every ```python block of README.md runs by itself in a
fresh interpreter (a temporary working directory, nothing from the other blocks) and exits 0;
the values its comments claim are asserted in the block. A block preceded by
``<!-- needs: kvm -->`` needs /dev/kvm (read and write), gcc and objcopy, and is skipped with
the reason when they are missing. The README names nothing outside the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXPECTED_BLOCKS = 8  # change together with the README: a parser change must not drop blocks
TIMEOUT = 120.0

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^`\s]*)\s*$")
NEEDS = re.compile(r"^\s*<!--\s*needs:\s*(?P<what>[\w ,-]+?)\s*-->\s*$")
KNOWN_NEEDS = {"kvm"}


@dataclass(frozen=True)
class Block:
    line: int
    """README line of the block's opening fence (1-based): a traceback's ``<string>`` line
    ``n`` is README line ``line + n``."""
    code: str
    needs: frozenset[str]


def python_blocks(text: str) -> list[Block]:
    """Every fenced block whose info string is ``python``, dedented as it sits in the README,
    with the needs of a ``<!-- needs: ... -->`` comment on the last non-blank line before it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        end = next(
            (j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"),
            None,
        )
        if end is None:
            raise AssertionError(f"README.md line {i + 1}: a code fence that is never closed")
        if m["lang"] == "python":
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            n = NEEDS.match(prev)
            needs = (
                frozenset(w.strip() for w in n["what"].split(",") if w.strip())
                if n
                else frozenset()
            )
            code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
            blocks.append(Block(i + 1, code, needs))
        i = end + 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def missing_for(need: str) -> list[str]:
    """What this machine lacks for a block's need (empty when it can run)."""
    if need != "kvm":
        raise AssertionError(f"unknown need {need!r} (known: {sorted(KNOWN_NEEDS)})")
    missing = []
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        missing.append("/dev/kvm (read and write)")
    missing += [tool for tool in ("gcc", "objcopy") if shutil.which(tool) is None]
    return missing


def test_every_python_block_is_found() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(BLOCKS) == text.count("```python") == EXPECTED_BLOCKS
    assert all(b.needs <= KNOWN_NEEDS for b in BLOCKS), [b.needs for b in BLOCKS]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.line}" for b in BLOCKS])
def test_python_block_runs_by_itself(block: Block, tmp_path: Path) -> None:
    missing = [m for need in sorted(block.needs) for m in missing_for(need)]
    if missing:
        pytest.skip(f"README.md line {block.line} needs {', '.join(missing)}")
    try:
        p = subprocess.run(
            [sys.executable, "-c", block.code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md line {block.line}: the block ran longer than {TIMEOUT:.0f} s")
    if p.returncode != 0:
        pytest.fail(
            f"README.md line {block.line}: exit {p.returncode}\n{p.stderr[-4000:]}", pytrace=False
        )


def test_the_readme_names_nothing_outside_the_repository() -> None:
    text = README.read_text(encoding="utf-8")
    bad = re.findall(r"\.\./[^\s)`]*|/work/[^\s)`]*|/home/[^\s)`]*", text)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|#", target):
            continue
        path = (ROOT / target.split("#")[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            bad.append(target)
    # Paths in backquotes that start at a top-level directory of the repository must exist.
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for path in re.findall(r"`([\w.-]+/[\w./-]*)`", text):
        if path.split("/")[0] in tops and not (ROOT / path).exists():
            bad.append(path)
    assert bad == [], f"README.md names paths outside the repository or missing: {bad}"
