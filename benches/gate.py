"""The benchmark gate: what makes ``python benches/report.py --gate`` (and so CI) fail.

Two kinds of check, both on ratios of times from one run, never on absolute times. A row's time
is its best round: other work on the machine only ever adds time, so the best round is what
repeats from run to run (medians moved by up to 4x between runs on a loaded 2-core machine).

- **peers**: in every group, pagehint's time is no slower than the best peer's (rows with role
  ``peer``; a limit or floor does other work and is not a competitor);
- **ceilings** (``benches/ceilings.toml``): pagehint's time in a group over a reference in the
  same run (the group's ``limit`` or ``floor`` row, or pagehint's row of another group) is at most
  the committed ``max``.

Machines are noisy and a regression is not: a check that fails is run again (only the groups it
reads) and fails the gate only if it fails in every attempt.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLE_REFERENCES = ("limit", "floor")


@dataclass(frozen=True)
class Timing:
    """One benchmark row of a run, as benches/ writes it to pytest-benchmark's JSON: its group,
    implementation, role and label, its median and best round, and the pytest node."""

    group: str
    impl: str
    role: str
    label: str
    median_s: float
    best_s: float
    rounds: int
    nbytes: int
    node: str


@dataclass(frozen=True)
class Ceiling:
    """pagehint's time in ``group`` over ``over``'s (``limit``, ``floor`` or a group) <= ``max``."""

    group: str
    over: str
    max: float

    @property
    def name(self) -> str:
        ref = f"the {self.over} row" if self.over in ROLE_REFERENCES else f"pagehint in {self.over}"
        return f"{self.group}: pagehint / {ref}"

    def groups(self) -> tuple[str, ...]:
        return (self.group,) if self.over in ROLE_REFERENCES else (self.group, self.over)


@dataclass(frozen=True)
class Verdict:
    """One check in one attempt: the figure measured and whether it passed."""

    check: str
    groups: tuple[str, ...]
    value: float
    limit: float
    detail: str

    @property
    def passed(self) -> bool:
        return self.value <= self.limit


class GateError(ValueError):
    """A ceilings file or a run the gate cannot judge (a missing group or row)."""


def load_ceilings(path: Path) -> list[Ceiling]:
    """Reads ``[[ceiling]]`` entries (``group``, ``over``, ``max``; other keys are notes)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise GateError(f"{path}: {e}") from e
    entries = data.get("ceiling", [])
    if not isinstance(entries, list) or not entries:
        raise GateError(f"{path}: no [[ceiling]] entries")
    out = []
    for i, entry in enumerate(entries):
        where = f"{path}: ceiling {i + 1}"
        if not isinstance(entry, dict):
            raise GateError(f"{where}: not a table")
        group, over, ceiling = entry.get("group"), entry.get("over"), entry.get("max")
        if not isinstance(group, str) or not group:
            raise GateError(f"{where}: 'group' must be a benchmark group's name")
        if not isinstance(over, str) or not over:
            raise GateError(f"{where}: 'over' must be 'limit', 'floor' or a group's name")
        if isinstance(ceiling, bool) or not isinstance(ceiling, (int, float)):
            raise GateError(f"{where}: 'max' must be a number")
        if not (math.isfinite(ceiling) and ceiling > 0):
            raise GateError(f"{where}: 'max' must be positive and finite, not {ceiling}")
        out.append(Ceiling(group=group, over=over, max=float(ceiling)))
    seen: set[tuple[str, str]] = set()
    for c in out:
        if (c.group, c.over) in seen:
            raise GateError(f"{path}: two ceilings for {c.name}")
        seen.add((c.group, c.over))
    return out


def timings(data: dict[str, Any]) -> list[Timing]:
    """The rows of a pytest-benchmark JSON document (as written by benches/)."""
    out = []
    for b in data.get("benchmarks", []):
        info, stats = b.get("extra_info", {}), b["stats"]
        out.append(
            Timing(
                group=str(b.get("group") or b["name"]),
                impl=str(info.get("impl", b.get("param") or b["name"])),
                role=str(info.get("role", "peer")),
                label=str(info.get("label", b["name"])),
                median_s=float(stats["median"]),
                best_s=float(stats["min"]),
                rounds=int(stats["rounds"]),
                nbytes=int(info.get("bytes", 0)),
                node=str(b.get("fullname", b["name"])),
            )
        )
    return out


def _by_group(rows: Iterable[Timing]) -> dict[str, list[Timing]]:
    groups: dict[str, list[Timing]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    return groups


def _one(rows: Sequence[Timing], role: str, group: str) -> Timing:
    found = [r for r in rows if r.role == role]
    if len(found) != 1:
        raise GateError(f"group {group!r} has {len(found)} {role} rows, not one")
    return found[0]


def judge(
    rows: Sequence[Timing], ceilings: Sequence[Ceiling], *, partial: bool = False
) -> list[Verdict]:
    """Every check that the rows allow: the peer check of each group present and each ceiling
    whose groups are present (a ceiling whose groups did not run is skipped, so a ``-k`` run
    judges what it ran; :func:`missing_groups` tells a full run's caller what is absent).
    A group without the rows a check needs is an error, or, when ``partial`` (a ``-k`` run
    that may select part of a group), a check skipped."""
    groups = _by_group(rows)
    verdicts = []
    for group, members in sorted(groups.items()):
        try:
            verdicts += _judge_peers(group, members)
        except GateError:
            if not partial:
                raise
    for c in ceilings:
        if any(g not in groups for g in c.groups()):
            continue
        try:
            verdicts.append(_judge_ceiling(c, groups))
        except GateError:
            if not partial:
                raise
    return verdicts


def _judge_peers(group: str, members: Sequence[Timing]) -> list[Verdict]:
    peers = [r for r in members if r.role == "peer"]
    if not peers:
        return []
    ph = _one(members, "pagehint", group)
    best = min(peers, key=lambda r: r.best_s)
    return [
        Verdict(
            check=f"{group}: pagehint no slower than its best peer",
            groups=(group,),
            value=ph.best_s / best.best_s,
            limit=1.0,
            detail=f"pagehint {_ms(ph.best_s)}, {best.label} {_ms(best.best_s)}",
        )
    ]


def _judge_ceiling(c: Ceiling, groups: dict[str, list[Timing]]) -> Verdict:
    ph = _one(groups[c.group], "pagehint", c.group)
    if c.over in ROLE_REFERENCES:
        ref = _one(groups[c.group], c.over, c.group)
        ref_name = c.over
    else:
        ref = _one(groups[c.over], "pagehint", c.over)
        ref_name = f"pagehint in {c.over.split(':')[0]}"
    if ref.best_s <= 0:
        raise GateError(f"{c.name}: the reference took no time")
    return Verdict(
        check=c.name,
        groups=c.groups(),
        value=ph.best_s / ref.best_s,
        limit=c.max,
        detail=f"pagehint {_ms(ph.best_s)}, {ref_name} {_ms(ref.best_s)}",
    )


def missing_groups(rows: Sequence[Timing], ceilings: Sequence[Ceiling]) -> list[str]:
    """Groups the ceilings name that the rows lack (a renamed benchmark leaves a stale ceiling)."""
    present = {r.group for r in rows}
    return sorted({g for c in ceilings for g in c.groups() if g not in present})


def nodes_of(rows: Sequence[Timing], groups: Iterable[str]) -> list[str]:
    """The pytest node ids that produce ``groups``' rows, for running them again."""
    wanted = set(groups)
    return sorted({r.node for r in rows if r.group in wanted})


def final(attempts: Sequence[Sequence[Verdict]]) -> list[tuple[Verdict, bool]]:
    """Each check of the first attempt with whether it failed in every attempt that judged it:
    the best attempt's verdict is kept, so the figure shown is the one that decided."""
    out = []
    for first in attempts[0]:
        tries = [v for a in attempts for v in a if v.check == first.check]
        best = min(tries, key=lambda v: v.value / v.limit)
        out.append((best, all(not v.passed for v in tries)))
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"
