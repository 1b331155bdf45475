"""Check release wheels before they ship (scripts/build-wheels runs this in its tool venv).

For each wheel: it is ``cp311-abi3``; it carries a shared object; every platform tag is a
manylinux tag no newer than ``--max-glibc`` (2.28: RHEL 8; Ubuntu 20.04 has 2.31); and
``auditwheel show`` (printed) agrees that nothing in it needs a glibc symbol version newer than
the oldest tag it claims. Exits 1 naming every problem; stdlib only, auditwheel runs as a module
of the same interpreter.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

Glibc = tuple[int, int]

LEGACY_TAGS: dict[str, Glibc] = {
    "manylinux1": (2, 5),
    "manylinux2010": (2, 12),
    "manylinux2014": (2, 17),
}
PEP600_TAG = re.compile(r"manylinux_(\d+)_(\d+)_\w+")
SYMBOL_VERSION = re.compile(r"'GLIBC_(\d+)\.(\d+)(?:\.\d+)*'")
CONSISTENT = re.compile(r'consistent with the following platform tag: "([\w.]+)"')


def tag_glibc(tag: str) -> Glibc | None:
    """The glibc a manylinux platform tag promises to run on, or None for any other tag."""
    if m := PEP600_TAG.fullmatch(tag):
        return int(m[1]), int(m[2])
    legacy, _, _arch = tag.partition("_")
    return LEGACY_TAGS.get(legacy)


def show(v: Glibc) -> str:
    return f"{v[0]}.{v[1]}"


def check(wheel: Path, max_glibc: Glibc) -> list[str]:
    """Problems with one wheel (empty: it may ship); prints auditwheel's report on the way."""
    parts = wheel.name.removesuffix(".whl").split("-")
    if len(parts) not in (5, 6):
        return [f"{wheel.name}: not a wheel file name"]
    python, abi, platforms = parts[-3:]
    problems = []
    if (python, abi) != ("cp311", "abi3"):
        problems.append(f"tagged {python}-{abi}, not cp311-abi3")
    with zipfile.ZipFile(wheel) as z:
        if not any(n.endswith(".so") for n in z.namelist()):
            problems.append("carries no shared object")
    claimed = [(t, tag_glibc(t)) for t in platforms.split(".")]
    glibcs = [g for _, g in claimed if g is not None]
    if len(glibcs) != len(claimed):
        problems.append(f"platform tag {platforms} is not all manylinux")
    if not glibcs:
        return problems
    oldest = min(glibcs)
    for tag, g in claimed:
        if g is not None and g > max_glibc:
            problems.append(f"tag {tag} needs glibc {show(g)}, newer than {show(max_glibc)}")

    report = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(wheel)],
        capture_output=True,
        text=True,
        check=False,
    )
    print(report.stdout.strip(), report.stderr.strip(), sep="\n", flush=True)
    flat = " ".join(report.stdout.split())  # auditwheel wraps its lines
    if report.returncode != 0:
        return [*problems, f"auditwheel show exited {report.returncode}"]
    needed = [(int(a), int(b)) for a, b in SYMBOL_VERSION.findall(flat)]
    verdict = CONSISTENT.search(flat)
    if not needed or verdict is None:
        return [*problems, "auditwheel's report lists no GLIBC_ versions or no platform tag"]
    newest_symbol = max(needed)
    consistent = tag_glibc(verdict[1])
    print(
        f"{wheel.name}: highest glibc symbol version GLIBC_{show(newest_symbol)}; "
        f"auditwheel: {verdict[1]}; the tag claims glibc {show(oldest)} "
        f"(limit {show(max_glibc)})"
    )
    if newest_symbol > oldest:
        problems.append(f"needs GLIBC_{show(newest_symbol)} but its tag claims {show(oldest)}")
    if consistent is None or consistent > oldest:
        problems.append(f"auditwheel finds it consistent with {verdict[1]} only")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", nargs="+", type=Path)
    parser.add_argument(
        "--max-glibc",
        default="2.28",
        help="newest glibc a wheel's tag may require (default: %(default)s, RHEL 8)",
    )
    args = parser.parse_args(argv)
    major, _, minor = args.max_glibc.partition(".")
    max_glibc = (int(major), int(minor))
    failed = False
    for wheel in args.wheels:
        print(f"\n--- {wheel.name}", flush=True)
        for problem in check(wheel, max_glibc):
            print(f"FAIL {wheel.name}: {problem}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
