"""Scenarios (TOML) that describe a guest, its history, its workload during migration and
the link, and ``run_scenario``, which migrates one over the simulated link.

``run_scenario(scenario, hints=...)`` builds the guest afresh from the scenario's seed, so the
runs with hints off and on start from the same memory.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pagehint import _core
from pagehint.device import FreePageHintDevice
from pagehint.migration import (
    LogMode,
    MigrationResult,
    Precopy,
    PrecopyConfig,
    Progress,
    WireFormat,
)
from pagehint.sim.guest import PAGE_POISON, SimulatedGuest
from pagehint.sim.link import LinkModel, SimulatedLink
from pagehint.sim.source import DEVICE_RATE, GUEST_HINT_RATE, SimulatedDestination, SimulatedSource
from pagehint.sim.workloads import (
    Idle,
    KernelCompile,
    MemoryHog,
    SteadyWriter,
    UsedWriter,
    Workload,
    WriteFree,
)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?b|bit)?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: int | float | str, *, binary: bool = True) -> int:
    """Bytes from ``8G``, ``8GiB``, ``512M``, ``4096``... (K/M/G/T in powers of 1024, unless
    ``binary=False``)."""
    if isinstance(value, (int, float)):
        return int(value)
    m = _SIZE.match(value)
    if not m or (m.group(3) or "").lower() == "bit":
        raise ValueError(f"not a size: {value!r} (try 8G, 512MiB, 4096)")
    base = 1024 if binary or (m.group(3) or "").lower() == "ib" else 1000
    return int(float(m.group(1)) * base ** _POWERS[m.group(2).lower()])


def parse_rate(value: int | float | str) -> float:
    """Bytes per second: ``10Gbit`` (network bits, powers of 1000), ``2.5GB`` (bytes, powers
    of 1000), ``100G`` or ``100GiB`` (bytes, powers of 1024, as QEMU's ``migrate_set_speed``
    reads it), or a number of bytes."""
    if isinstance(value, (int, float)):
        return float(value)
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"not a rate: {value!r} (try 10Gbit, 1.25GB, 100G)")
    unit = (m.group(3) or "").lower()
    power = _POWERS[m.group(2).lower()]
    if unit == "bit":
        return float(m.group(1)) * float(1000**power) / 8
    if unit == "b":
        return float(m.group(1)) * float(1000**power)
    return float(m.group(1)) * float(1024**power)


def parse_seconds(value: int | float | str) -> float:
    """Seconds from ``300ms``, ``0.3s``, ``0.3``."""
    if isinstance(value, (int, float)):
        return float(value)
    m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*$", value)
    if not m:
        raise ValueError(f"not a duration: {value!r} (try 300ms, 0.3s)")
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)


WORKLOADS = ("idle", "memory-hog", "steady-writer", "kernel-compile", "write-free", "used-writer")


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload by name with its parameters (sizes as strings allowed)."""

    kind: str = "idle"
    params: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Workload:
        p = dict(self.params)
        try:
            if self.kind == "idle":
                return Idle(float(p.pop("pages_per_s", 0.0)))
            if self.kind == "memory-hog":
                rate = p.pop("rate", None)
                return MemoryHog(
                    parse_size(p.pop("size")), None if rate is None else parse_size(rate)
                )
            if self.kind == "steady-writer":
                return SteadyWriter(parse_size(p.pop("working_set")), float(p.pop("pages_per_s")))
            if self.kind == "kernel-compile":
                d = KernelCompile()
                return KernelCompile(
                    alloc_bytes_per_s=parse_size(p.pop("alloc_bytes_per_s", d.alloc_bytes_per_s)),
                    lifetime_s=float(p.pop("lifetime_s", d.lifetime_s)),
                    cache_bytes_per_s=parse_size(p.pop("cache_bytes_per_s", d.cache_bytes_per_s)),
                )
            if self.kind == "write-free":
                return WriteFree(parse_size(p.pop("write")), parse_size(p.pop("free", 0)))
            if self.kind == "used-writer":
                return UsedWriter(float(p.pop("pages_per_s")), int(p.pop("kernel_pages", 0)))
        except KeyError as e:
            raise ValueError(f"workload {self.kind!r} needs {e.args[0]!r}") from None
        finally:
            if p and self.kind in WORKLOADS:
                raise ValueError(f"workload {self.kind!r} has unknown parameters {sorted(p)}")
        raise ValueError(f"unknown workload {self.kind!r}; one of {', '.join(WORKLOADS)}")


@dataclass(frozen=True)
class Scenario:
    """A guest, what it ran before, what it runs during migration, and the link."""

    name: str = "custom"
    description: str = ""
    memory: int = 8 << 30
    layout: Literal["x86", "flat"] = "x86"
    below_4g: int | None = None
    """x86 layout: RAM below the PCI hole (the rest from 4 GiB); None for QEMU's up to 2 GiB."""
    page_size: int = 4096
    block_bytes: int | None = None
    """The allocator's and the hints' block size; None for the hint order's (4 MiB with 4 KiB
    pages)."""
    used: float = 0.1
    used_data: float = 1.0
    """The fraction of the pages of the blocks used at boot that hold data (the rest zeros)."""
    free_order: Literal["random", "address"] = "random"
    """The boot free list: shuffled, or the lowest address handed out first."""
    init_on_alloc: bool = True
    poison: int | None = None
    log_mode: LogMode = "classic"
    seed: int = 1
    hint_rate: float = GUEST_HINT_RATE
    device_rate: float = DEVICE_RATE
    history: tuple[WorkloadSpec, ...] = ()
    workload: WorkloadSpec = WorkloadSpec()
    precopy: PrecopyConfig = field(default_factory=PrecopyConfig)
    link: LinkModel = field(default_factory=LinkModel)
    published: dict[str, Any] = field(default_factory=dict)

    def memmap(self) -> _core.MemoryMap:
        if self.layout == "x86":
            below = min(self.memory, 2 << 30) if self.below_4g is None else self.below_4g
            return _core.MemoryMap.x86(self.memory, below_4g=below, page_size=self.page_size)
        if self.layout == "flat":
            return _core.MemoryMap([(0, self.memory)], page_size=self.page_size)
        raise ValueError(f"layout must be 'x86' or 'flat', not {self.layout!r}")


def scenario_from_dict(d: dict[str, Any], name: str = "custom") -> Scenario:
    """A scenario from parsed TOML (see the shipped ``pagehint/scenarios/*.toml``)."""
    d = dict(d)
    guest = dict(d.pop("guest", {}))
    link = dict(d.pop("link", {}))
    mig = dict(d.pop("migration", {}))
    poison = guest.pop("poison", "none")
    kw: dict[str, Any] = {
        "name": d.pop("name", name),
        "description": d.pop("description", ""),
        "published": dict(d.pop("published", {})),
    }
    for key in ("memory", "below_4g", "block_bytes"):
        if key in guest:
            kw[key] = parse_size(guest.pop(key))
    for key in ("layout", "log_mode", "free_order"):
        if key in guest:
            kw[key] = guest.pop(key)
    for key, conv in (
        ("page_size", int),
        ("used", float),
        ("used_data", float),
        ("init_on_alloc", bool),
        ("seed", int),
        ("hint_rate", float),
        ("device_rate", float),
    ):
        if key in guest:
            kw[key] = conv(guest.pop(key))
    kw["poison"] = (
        {"none": None, "init_on_free": 0, "page_poison": PAGE_POISON}.get(poison, poison)
        if isinstance(poison, str)
        else int(poison)
    )
    if isinstance(kw["poison"], str):
        raise ValueError(
            f"poison must be none, init_on_free, page_poison or a number, not {poison!r}"
        )
    kw["history"] = tuple(_workload(w) for w in d.pop("history", []))
    if "workload" in d:
        kw["workload"] = _workload(d.pop("workload"))
    pc: dict[str, Any] = {}
    lm: dict[str, Any] = {}
    wire: dict[str, Any] = {}
    for key in ("bandwidth", "scan_rate"):
        if key in link:
            lm[key] = parse_rate(link.pop(key))
    for key in ("setup_time", "switchover_time", "startup_wait"):
        if key in link:
            lm[key] = parse_seconds(link.pop(key))
    for key in ("page_header_bytes", "zero_page_bytes", "batch_header_bytes"):
        if key in link:
            wire[key] = int(link.pop(key))
    if "startup_buffer" in link:
        lm["startup_buffer"] = parse_size(link.pop("startup_buffer"))
    for key in ("max_downtime", "iteration_time"):
        if key in link:
            pc[key] = parse_seconds(link.pop(key))
    for key in ("max_rounds", "batch_pages"):
        if key in link:
            pc[key] = int(link.pop(key))
    for key in ("strategy", "postcopy"):
        if key in mig:
            pc[key] = mig.pop(key)
    leftovers = {
        k: v
        for k, v in (("top level", d), ("[guest]", guest), ("[link]", link), ("[migration]", mig))
        if v
    }
    if leftovers:
        raise ValueError(f"unknown scenario keys: {leftovers}")
    kw["precopy"] = PrecopyConfig(**pc)
    kw["link"] = LinkModel(wire=WireFormat(**wire), **lm)
    return Scenario(**kw)


def scenario_to_dict(s: Scenario) -> dict[str, Any]:
    """The scenario as ``scenario_from_dict`` reads it (every value explicit, so the file
    means the same if a default changes): ``scenario_from_dict(scenario_to_dict(s)) == s``.
    ``ValueError`` for what a scenario file cannot say (``clear_chunk_pages`` other than the
    default; ``hints``, which ``run_scenario`` sets, is left out)."""
    pc, link = s.precopy, s.link
    if pc.clear_chunk_pages != PrecopyConfig.clear_chunk_pages:
        raise ValueError("a scenario file cannot set clear_chunk_pages")
    guest: dict[str, Any] = {"memory": s.memory, "layout": s.layout}
    if s.below_4g is not None:
        guest["below_4g"] = s.below_4g
    guest["page_size"] = s.page_size
    if s.block_bytes is not None:
        guest["block_bytes"] = s.block_bytes
    guest.update(
        used=s.used,
        used_data=s.used_data,
        free_order=s.free_order,
        init_on_alloc=s.init_on_alloc,
        poison="none" if s.poison is None else s.poison,
        log_mode=s.log_mode,
        seed=s.seed,
        hint_rate=s.hint_rate,
        device_rate=s.device_rate,
    )
    out: dict[str, Any] = {"name": s.name, "description": s.description}
    if s.published:
        out["published"] = dict(s.published)
    out["guest"] = guest
    if s.history:
        out["history"] = [{"kind": w.kind, **w.params} for w in s.history]
    out["workload"] = {"kind": s.workload.kind, **s.workload.params}
    out["link"] = {
        "bandwidth": link.bandwidth,
        "scan_rate": link.scan_rate,
        "setup_time": link.setup_time,
        "switchover_time": link.switchover_time,
        "startup_wait": link.startup_wait,
        "startup_buffer": link.startup_buffer,
        "page_header_bytes": link.wire.page_header_bytes,
        "zero_page_bytes": link.wire.zero_page_bytes,
        "batch_header_bytes": link.wire.batch_header_bytes,
        "max_downtime": pc.max_downtime,
        "iteration_time": pc.iteration_time,
        "max_rounds": pc.max_rounds,
        "batch_pages": pc.batch_pages,
    }
    out["migration"] = {"strategy": pc.strategy, "postcopy": pc.postcopy}
    return out


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # 0.3, 1e+20, inf, nan: all TOML floats
    if isinstance(v, str):
        # A JSON string (ASCII, escapes \" \\ \n \uXXXX) is a TOML basic string, but for DEL.
        return json.dumps(v).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"a scenario file cannot hold {type(v).__name__} {v!r}")


def scenario_to_toml(s: Scenario) -> str:
    """The scenario as a TOML file that ``pagehint simulate FILE`` runs (``load_scenario``
    reads back a scenario equal to ``s``)."""
    d = scenario_to_dict(s)
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in d.items():
        if isinstance(value, dict):
            tables.append((f"[{_toml_key(key)}]", value))
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            tables.extend((f"[[{_toml_key(key)}]]", x) for x in value)
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for header, table in tables:
        lines += ["", header]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _workload(d: dict[str, Any]) -> WorkloadSpec:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind is None:
        raise ValueError(f"a workload needs a kind ({', '.join(WORKLOADS)})")
    spec = WorkloadSpec(str(kind), d)
    spec.build()  # fail now, not mid-run
    return spec


def shipped_scenarios() -> dict[str, Path]:
    """The scenarios shipped with pagehint, by name."""
    root = resources.files("pagehint.sim") / "scenarios"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".toml")}


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name, or a TOML file."""
    shipped = shipped_scenarios()
    path = shipped.get(name_or_path, Path(name_or_path))
    if not path.is_file():
        raise FileNotFoundError(
            f"no scenario {name_or_path!r}: not a file, nor one of {', '.join(sorted(shipped))}"
        )
    with open(path, "rb") as f:
        try:
            return scenario_from_dict(tomllib.load(f), name=path.stem)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
        except (TypeError, AttributeError) as e:
            raise ValueError(f"{path}: malformed scenario ({e})") from None


def run_scenario(
    scenario: Scenario,
    *,
    hints: bool,
    progress: Callable[[Progress], None] | None = None,
) -> MigrationResult:
    """Builds the scenario's guest and migrates it once, with hints on or off, checking the
    result with the nothing-lost oracle."""
    memmap = scenario.memmap()
    guest = SimulatedGuest(
        memmap,
        seed=scenario.seed,
        used=scenario.used,
        used_data=scenario.used_data,
        free_order=scenario.free_order,
        init_on_alloc=scenario.init_on_alloc,
        poison=scenario.poison,
        log_mode=scenario.log_mode,
        block_bytes=scenario.block_bytes,
    )
    for spec in scenario.history:
        w = spec.build()
        guest.run(w, 0.0)
        while isinstance(w, MemoryHog) and not w.done:
            guest.run(w, 1.0)
    device = FreePageHintDevice(guest.ram, memmap)
    guest.driver.attach(device)
    guest.log.get()  # the guest ran before migration; dirty tracking starts now
    if guest.log.mode == "manual":
        guest.log.clear(0, guest.npages)
    guest.workloads.append(scenario.workload.build())
    source = SimulatedSource(
        guest, device, hint_rate=scenario.hint_rate, device_rate=scenario.device_rate
    )
    destination = SimulatedDestination(guest)
    config = replace(scenario.precopy, hints=hints)
    link = SimulatedLink(source, scenario.link)
    migration = Precopy(
        source,
        destination,
        link,
        config,
        progress=progress,
        lost_pages=lambda: len(guest.lost_pages(destination.contents)),
    )
    return migration.run()


def reduction(off: float, on: float) -> float:
    """How much less ``on`` is than ``off``, as a fraction (0.79 = 79 % less)."""
    return 0.0 if off == 0 else 1.0 - on / off
