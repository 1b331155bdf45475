"""Scenarios (TOML) that describe a guest, its history, its workload during migration and
the link, and ``run_scenario``, which migrates one over the simulated link.

What a valid scenario is, is ``pagehint.sim.scenario_model``'s alone: files are read through
it (``scenario_from_dict``, ``load_scenario``) and every ``Scenario`` is checked against it
when it is made, however it is made.

``run_scenario(scenario, hints=...)`` builds the guest afresh from the scenario's seed, so the
runs with hints off and on start from the same memory.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping
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
from pagehint.sim.guest import SimulatedGuest
from pagehint.sim.link import LinkModel, SimulatedLink
from pagehint.sim.scenario_model import (
    WORKLOADS,
    ScenarioError,
    parse_rate,
    parse_seconds,
    parse_size,
    ram_regions,
    validate_document,
    validate_workload,
)
from pagehint.sim.source import DEVICE_RATE, GUEST_HINT_RATE, SimulatedDestination, SimulatedSource
from pagehint.sim.workloads import MemoryHog, Workload

__all__ = [
    "WORKLOADS",
    "Scenario",
    "ScenarioError",
    "WorkloadSpec",
    "load_scenario",
    "parse_rate",
    "parse_seconds",
    "parse_size",
    "read_scenario",
    "reduction",
    "run_scenario",
    "scenario_from_dict",
    "scenario_to_dict",
    "scenario_to_toml",
    "shipped_scenarios",
]


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload by name with its parameters, as a scenario file gives them (sizes as
    strings allowed); ``build()`` checks them against the workload's model
    (``pagehint.sim.scenario_model``) and makes the workload."""

    kind: str = "idle"
    params: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Workload:
        return validate_workload(self.kind, self.params).build()


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

    def __post_init__(self) -> None:
        # Every scenario, however made, is one the model accepts.
        validate_document(_document(self), source=f"scenario {self.name}")

    def memmap(self) -> _core.MemoryMap:
        regions = ram_regions(self.layout, self.memory, self.below_4g)
        if self.layout == "x86":
            return _core.MemoryMap.x86(
                self.memory, below_4g=regions[0][1], page_size=self.page_size
            )
        return _core.MemoryMap(regions, page_size=self.page_size)


def scenario_from_dict(
    d: Mapping[str, Any],
    name: str = "custom",
    *,
    source: str | None = None,
    options: Mapping[tuple[str | int, ...], str] | None = None,
) -> Scenario:
    """A scenario from parsed TOML (see the shipped ``pagehint/scenarios/*.toml``), checked
    against the model (``pagehint.sim.scenario_model``): ``ScenarioError`` (a ``ValueError``)
    in one line naming ``source`` (default: ``scenario NAME``) and the key, or the
    command-line option in ``options`` that set it."""
    doc = validate_document(d, source=source or f"scenario {name}", options=options)
    g, link, mig = doc.guest, doc.link, doc.migration
    raw_workload = d.get("workload", {"kind": "idle"})
    return Scenario(
        name=doc.name if doc.name is not None else name,
        description=doc.description,
        memory=g.memory,
        layout=g.layout,
        below_4g=g.below_4g,
        page_size=g.page_size,
        block_bytes=g.block_bytes,
        used=g.used,
        used_data=g.used_data,
        free_order=g.free_order,
        init_on_alloc=g.init_on_alloc,
        poison=g.poison,
        log_mode=g.log_mode,
        seed=g.seed,
        hint_rate=g.hint_rate,
        device_rate=g.device_rate,
        # The workloads' parameters as written: what ``describe`` shows and a file says back.
        history=tuple(_spec(w) for w in d.get("history", [])),
        workload=_spec(raw_workload),
        precopy=PrecopyConfig(
            max_downtime=link.max_downtime,
            max_rounds=link.max_rounds,
            iteration_time=link.iteration_time,
            batch_pages=link.batch_pages,
            strategy=mig.strategy,
            postcopy=mig.postcopy,
        ),
        link=LinkModel(
            bandwidth=link.bandwidth,
            scan_rate=link.scan_rate,
            wire=WireFormat(
                page_header_bytes=link.page_header_bytes,
                zero_page_bytes=link.zero_page_bytes,
                batch_header_bytes=link.batch_header_bytes,
            ),
            setup_time=link.setup_time,
            switchover_time=link.switchover_time,
            startup_wait=link.startup_wait,
            startup_buffer=link.startup_buffer,
        ),
        published=dict(d.get("published", {})),
    )


def _spec(d: Mapping[str, Any]) -> WorkloadSpec:
    params = dict(d)
    return WorkloadSpec(str(params.pop("kind")), params)


def scenario_to_dict(s: Scenario) -> dict[str, Any]:
    """The scenario as ``scenario_from_dict`` reads it (every value explicit, so the file
    means the same if a default changes): ``scenario_from_dict(scenario_to_dict(s)) == s``.
    ``ValueError`` for what a scenario file cannot say (``clear_chunk_pages`` other than the
    default; ``hints``, which ``run_scenario`` sets, is left out)."""
    if s.precopy.clear_chunk_pages != PrecopyConfig.clear_chunk_pages:
        raise ValueError("a scenario file cannot set clear_chunk_pages")
    return _document(s)


def _document(s: Scenario) -> dict[str, Any]:
    pc, link = s.precopy, s.link
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


def shipped_scenarios() -> dict[str, Path]:
    """The scenarios shipped with pagehint, by name."""
    root = resources.files("pagehint.sim") / "scenarios"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".toml")}


def read_scenario(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """The file of a shipped scenario (by name) or a TOML file, and its parsed document;
    ``ScenarioError`` (one line, naming the file) if it cannot be found, read or parsed."""
    shipped = shipped_scenarios()
    path = shipped.get(name_or_path, Path(name_or_path))
    if not path.is_file():
        raise ScenarioError(
            f"no scenario {name_or_path!r}: not a file, nor one of {', '.join(sorted(shipped))}"
        )
    try:
        with open(path, "rb") as f:
            return path, tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ScenarioError(
            f"{path}: not UTF-8, so not TOML ({e.reason} at byte {e.start})"
        ) from None
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read it: {e.strerror}") from None


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name, or a TOML file (``ScenarioError`` if it is not valid)."""
    path, doc = read_scenario(name_or_path)
    return scenario_from_dict(doc, name=path.stem, source=str(path))


def guest_after_history(scenario: Scenario) -> SimulatedGuest:
    """The scenario's guest, built from its seed, after its ``[[history]]`` ran (a memory hog
    to its end): what a migration of it starts from."""
    guest = SimulatedGuest(
        scenario.memmap(),
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
    return guest


def run_scenario(
    scenario: Scenario,
    *,
    hints: bool,
    progress: Callable[[Progress], None] | None = None,
) -> MigrationResult:
    """Builds the scenario's guest and migrates it once, with hints on or off, checking the
    result with the nothing-lost oracle."""
    guest = guest_after_history(scenario)
    memmap = guest.memmap
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
