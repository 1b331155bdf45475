"""What a valid scenario is: the typed model that scenario files (TOML) and the command line's
overrides are validated against, strictly, with pydantic v2.

A scenario document is the TOML file's tables: top-level ``name``, ``description``;
``[published]``, ``[guest]``, ``[[history]]``, ``[workload]``, ``[link]``, ``[migration]``.
Every key has a type and, where it has one, a range; nothing is converted behind the reader's
back: a string is not a boolean (``init_on_alloc = "false"`` is refused, not read as true), a
float is not an integer (``seed = 1.5``), infinities and NaN are not numbers anywhere. Sizes
are a whole number of bytes or a string with a unit (``8G``, ``512MiB``), rates a number of
bytes per second or a string (``10Gbit``, ``2.5GB``, ``100G``), durations a number of seconds
or a string (``300ms``, ``0.3s``). The guest's sizes are page-aligned and within the guest;
a workload may ask for more memory than the guest has (its allocator gives what it has, as a
guest out of memory does: the default scenario's 6 GiB hog in a 1 GiB guest gives up).

``validate_document`` checks a document and returns the model or raises ``ScenarioError``,
one line naming the file (or the command-line option) and the key path, such as
``default.toml: [guest] memory: ...``; ``scenario_json_schema`` is the model as a JSON schema
(``pagehint simulate --schema``). ``pagehint.sim.scenario`` turns a validated document into
a ``Scenario`` and checks every ``Scenario`` against this model when it is made.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from pagehint.migration import PrecopyConfig, WireFormat
from pagehint.sim.guest import HINT_BLOCK_BYTES, PAGE_POISON
from pagehint.sim.link import LinkModel
from pagehint.sim.source import DEVICE_RATE, GUEST_HINT_RATE
from pagehint.sim.workloads import (
    Idle,
    KernelCompile,
    MemoryHog,
    SteadyWriter,
    UsedWriter,
    Workload,
    WriteFree,
)

__all__ = [
    "MAX_MEMORY",
    "PAGE_SIZES",
    "WORKLOADS",
    "GuestTable",
    "LinkTable",
    "MigrationTable",
    "ScenarioDocument",
    "ScenarioError",
    "WorkloadModel",
    "parse_rate",
    "parse_seconds",
    "parse_size",
    "ram_regions",
    "scenario_json_schema",
    "validate_document",
    "validate_workload",
]

GiB = 1 << 30
FOUR_GIB = 4 * GiB
MAX_MEMORY = 1 << 52
"""The most guest RAM a scenario may name: x86-64's 52-bit guest-physical address space
(4 PiB). Whether a run that big fits this machine is ``pagehint.sim.estimate``'s question."""
PAGE_SIZES = tuple(sorted(HINT_BLOCK_BYTES))
"""Linux's base page sizes the guest model knows (4 KiB; 16 and 64 KiB on arm64)."""
TOML_INT_MAX = 2**63 - 1
"""The largest integer a TOML file can hold: what a scenario written back must say."""
MAX_RATE = 1e15
"""The most any per-second figure may say (a PB/s, 10^15 pages/s): rates beyond any machine,
bounded so that rate times time stays a finite float."""
MIN_LINK_RATE = 1.0
"""The least a link or a sender moves: a byte per second."""
MAX_SECONDS = 1e9
"""The longest duration a scenario may name (some 32 years)."""


class ScenarioError(ValueError):
    """A scenario that is not valid, in one line: where (the file and the key, or the
    command-line option) and what is wrong."""


# -- units --------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?b|bit)?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_SECONDS = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*$")


def parse_size(value: int | float | str, *, binary: bool = True) -> int:
    """Bytes from ``8G``, ``8GiB``, ``512M``, ``4096``... (K/M/G/T/P in powers of 1024, unless
    ``binary=False``). A size is a whole number of bytes: ``1.5`` and ``0.1G`` are refused,
    and so are infinities and NaN."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r} (try 8G, 512MiB, 4096)")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValueError(f"not a size: {value!r} (a whole number of bytes, or 8G, 512MiB)")
    m = _SIZE.match(value)
    if not m or (m.group(3) or "").lower() == "bit":
        raise ValueError(f"not a size: {value!r} (try 8G, 512MiB, 4096)")
    base = 1024 if binary or (m.group(3) or "").lower() == "ib" else 1000
    exact = Fraction(m.group(1)) * base ** _POWERS[m.group(2).lower()]
    if exact.denominator != 1:
        raise ValueError(f"not a size: {value!r} is {float(exact):g} bytes, not a whole number")
    return int(exact)


def parse_rate(value: int | float | str) -> float:
    """Bytes per second: ``10Gbit`` (network bits, powers of 1000), ``2.5GB`` (bytes, powers
    of 1000), ``100G`` or ``100GiB`` (bytes, powers of 1024, as QEMU's ``migrate_set_speed``
    reads it), or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a rate: {value!r} (try 10Gbit, 1.25GB, 100G)")
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
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r} (try 300ms, 0.3s)")
    if isinstance(value, (int, float)):
        return float(value)
    m = _SECONDS.match(value)
    if not m:
        raise ValueError(f"not a duration: {value!r} (try 300ms, 0.3s)")
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)


def _size(value: Any) -> Any:
    # A string becomes an int; a float is refused (no float for an integer); anything else
    # goes to the strict int check.
    if isinstance(value, (float, bool)):
        raise ValueError(f"not a size: {value!r} (a whole number of bytes, or 8G, 512MiB)")
    return parse_size(value) if isinstance(value, str) else value


def _number(parse: Any, unit: str, low: float, high: float) -> Any:
    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            return value  # numbers go to the strict float check and its range
        number = parse(value)
        if not low <= number <= high:
            raise ValueError(f"{value!r} is {number:g} {unit}: not within {low:g} to {high:g}")
        return number

    return convert


_SIZE_PATTERN = r"^\s*[0-9]*\.?[0-9]+\s*[kKmMgGtTpP]?([iI]?[bB])?\s*$"
_SIZE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": _SIZE_PATTERN},
    ],
    "description": "bytes: a whole number, or a string with a unit (8G, 512MiB, 4096)",
}
_POSITIVE_SIZE_SCHEMA: dict[str, Any] = {
    **_SIZE_SCHEMA,
    "anyOf": [{"type": "integer", "minimum": 1}, _SIZE_SCHEMA["anyOf"][1]],
}
_RATE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "minimum": MIN_LINK_RATE, "maximum": MAX_RATE},
        {"type": "string", "pattern": r"^\s*[0-9]*\.?[0-9]+\s*[kKmMgGtTpP]?([iI]?[bB]|bit)?\s*$"},
    ],
    "description": "bytes per second: a number, or 10Gbit (bits, powers of 1000), "
    "2.5GB (bytes, powers of 1000), 100G or 100GiB (bytes, powers of 1024)",
}
_SECONDS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "minimum": 0, "maximum": MAX_SECONDS},
        {"type": "string", "pattern": r"^\s*[0-9]*\.?[0-9]+\s*(ms|s)?\s*$"},
    ],
    "description": "seconds: a number, or 300ms, 0.3s",
}

Size = Annotated[
    int, BeforeValidator(_size), Field(ge=0, le=TOML_INT_MAX), WithJsonSchema(_SIZE_SCHEMA)
]
PositiveSize = Annotated[
    int, BeforeValidator(_size), Field(gt=0, le=TOML_INT_MAX), WithJsonSchema(_POSITIVE_SIZE_SCHEMA)
]
Rate = Annotated[
    float,
    BeforeValidator(_number(parse_rate, "bytes/s", MIN_LINK_RATE, MAX_RATE)),
    Field(ge=MIN_LINK_RATE, le=MAX_RATE),
    WithJsonSchema(_RATE_SCHEMA),
]
Seconds = Annotated[
    float,
    BeforeValidator(_number(parse_seconds, "s", 0, MAX_SECONDS)),
    Field(ge=0, le=MAX_SECONDS),
    WithJsonSchema(_SECONDS_SCHEMA),
]
PositiveSeconds = Annotated[
    float,
    BeforeValidator(_number(parse_seconds, "s", 0, MAX_SECONDS)),
    Field(gt=0, le=MAX_SECONDS),
    WithJsonSchema(_SECONDS_SCHEMA),
]
Count = Annotated[int, Field(ge=0, le=TOML_INT_MAX)]
PositiveCount = Annotated[int, Field(ge=1, le=TOML_INT_MAX)]
Fraction01 = Annotated[float, Field(ge=0.0, le=1.0)]
PerSecond = Annotated[float, Field(ge=0.0, le=MAX_RATE)]
PositivePerSecond = Annotated[float, Field(gt=0.0, le=MAX_RATE)]

_POISON_NAMES: dict[str, int | None] = {
    "none": None,
    "init_on_free": 0,
    "page_poison": PAGE_POISON,
}


def _poison(value: Any) -> Any:
    if isinstance(value, str) and value in _POISON_NAMES:
        return _POISON_NAMES[value]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFF_FFFF:
        return value
    raise ValueError(
        f"must be none, init_on_free, page_poison or a u32 (0 to 0xFFFFFFFF), not {value!r}"
    )


Poison = Annotated[
    int | None,
    BeforeValidator(_poison),
    WithJsonSchema(
        {
            "anyOf": [
                {"enum": list(_POISON_NAMES)},
                {"type": "integer", "minimum": 0, "maximum": 0xFFFF_FFFF},
            ],
            "description": "the value freed pages are filled with: none, init_on_free (0), "
            "page_poison (0xAA), or a u32",
        }
    ),
]


class KeyProblem(ValueError):
    """A rule across keys of a table, blamed on ``key``."""

    def __init__(self, key: str | int, message: str) -> None:
        super().__init__(message)
        self.key = key


class _Model(BaseModel):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        allow_inf_nan=False,
        frozen=True,
        use_attribute_docstrings=True,
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n < GiB else f"{n / GiB:g} GiB"


# -- the guest ----------------------------------------------------------------------------------


def ram_regions(
    layout: Literal["x86", "flat"], memory: int, below_4g: int | None
) -> list[tuple[int, int]]:
    """Guest RAM as ``(gpa, size)`` regions: ``flat`` from 0; ``x86`` up to ``below_4g``
    (None: QEMU's up to 2 GiB) below the PCI hole, the rest from 4 GiB."""
    if layout == "flat":
        return [(0, memory)]
    below = min(memory, 2 * GiB) if below_4g is None else min(memory, below_4g)
    return [(0, below)] + ([(FOUR_GIB, memory - below)] if memory > below else [])


def whole_blocks(regions: Sequence[tuple[int, int]], block_bytes: int) -> int:
    """Naturally aligned blocks entirely inside one region (what the guest allocates)."""
    n = 0
    for gpa, size in regions:
        first = -(-gpa // block_bytes) * block_bytes
        n += max(0, (gpa + size) // block_bytes * block_bytes - first) // block_bytes
    return n


class GuestTable(_Model):
    """``[guest]``: the guest's memory, kernel and dirty log."""

    memory: PositiveSize = 8 * GiB
    """Guest RAM in bytes: whole pages, at most 4 PiB."""
    layout: Literal["x86", "flat"] = "x86"
    """x86: RAM below the PCI hole and the rest from 4 GiB; flat: one region from 0."""
    below_4g: PositiveSize | None = None
    """x86 layout only: RAM below the PCI hole, whole pages, at most 4 GiB and at most the
    memory (default: QEMU's, up to 2 GiB)."""
    page_size: Literal[4096, 16384, 65536] = 4096
    """The guest's base page size in bytes."""
    block_bytes: PositiveSize | None = None
    """The allocator's and the hints' block size: a power of two, whole pages (default: the
    hint order's, 4 MiB with 4 KiB pages); the guest needs at least two."""
    used: Fraction01 = 0.1
    """The fraction of RAM in use at boot, not hintable (taken in whole blocks)."""
    used_data: Fraction01 = 1.0
    """The fraction of the boot blocks' pages that hold data (the rest zeros)."""
    free_order: Literal["random", "address"] = "random"
    """The boot free list: shuffled, or the lowest address handed out first."""
    init_on_alloc: bool = True
    """Linux's init_on_alloc: the allocator zeroes every block it hands out."""
    poison: Poison = Field(default=None, json_schema_extra={"default": "none"})
    log_mode: Literal["classic", "manual", "ring"] = "classic"
    """The KVM dirty log: classic, manual (KVM_CLEAR_DIRTY_LOG) or ring."""
    seed: Count = 1
    """The guest's random seed (a TOML integer, not negative)."""
    hint_rate: PositivePerSecond = GUEST_HINT_RATE
    """Blocks per second the guest's balloon driver hints."""
    device_rate: PositivePerSecond = DEVICE_RATE
    """Elements per second the device takes off the free page queue."""

    @model_validator(mode="after")
    def _fits(self) -> GuestTable:
        page = self.page_size
        if self.memory % page:
            raise KeyProblem(
                "memory", f"{self.memory} bytes is not a whole number of {page}-byte pages"
            )
        if self.memory > MAX_MEMORY:
            raise KeyProblem(
                "memory",
                f"{self.memory} bytes is more than the 4 PiB of a 52-bit guest-physical space",
            )
        if self.below_4g is not None:
            b = self.below_4g
            if self.layout != "x86":
                raise KeyProblem("below_4g", "only the x86 layout has RAM below a PCI hole")
            if b % page:
                raise KeyProblem(
                    "below_4g", f"{b} bytes is not a whole number of {page}-byte pages"
                )
            if b > min(self.memory, FOUR_GIB):
                raise KeyProblem(
                    "below_4g",
                    f"{_mib(b)} is more than the memory ({_mib(self.memory)}) or 4 GiB",
                )
        block = self.hint_block_bytes
        if self.block_bytes is not None and (block % page or block & (block - 1)):
            raise KeyProblem(
                "block_bytes", f"{block} is not a power of two of at least {page} (the page size)"
            )
        blocks = whole_blocks(self.regions(), block)
        if blocks < 2:
            raise KeyProblem(
                "memory" if self.block_bytes is None else "block_bytes",
                f"{_mib(self.memory)} of {self.layout} RAM holds {blocks} whole "
                f"{_mib(block)} block(s); the guest needs at least two",
            )
        return self

    @property
    def hint_block_bytes(self) -> int:
        """``block_bytes``, or the hint order's block for the page size."""
        return HINT_BLOCK_BYTES[self.page_size] if self.block_bytes is None else self.block_bytes

    def regions(self) -> list[tuple[int, int]]:
        return ram_regions(self.layout, self.memory, self.below_4g)


# -- workloads ----------------------------------------------------------------------------------


class _Workload(_Model):
    def build(self) -> Workload:
        raise NotImplementedError


class IdleModel(_Workload):
    """An idle guest: the kernel writes a few of its own pages (timers, logs, RCU)."""

    kind: Literal["idle"]
    pages_per_s: PerSecond = 0.0
    """Kernel pages written per second."""

    def build(self) -> Workload:
        return Idle(self.pages_per_s)


class MemoryHogModel(_Workload):
    """Allocates ``size``, writes every page, then frees it all (a finished batch job)."""

    kind: Literal["memory-hog"]
    size: PositiveSize
    """Bytes allocated and written (the guest gives what it has: more is an out-of-memory
    hog that gives up)."""
    rate: PositiveSize | None = None
    """Bytes allocated per second (at once if not given)."""

    def build(self) -> Workload:
        return MemoryHog(self.size, self.rate)


class SteadyWriterModel(_Workload):
    """Writes random pages of a working set (a database or cache at steady state)."""

    kind: Literal["steady-writer"]
    working_set: Size
    """Bytes of the working set (what the guest can give, if less)."""
    pages_per_s: PerSecond
    """Pages of the working set written per second."""

    def build(self) -> Workload:
        return SteadyWriter(self.working_set, self.pages_per_s)


class KernelCompileModel(_Workload):
    """``make -j`` churn: short-lived anonymous memory and a growing page cache."""

    kind: Literal["kernel-compile"]
    alloc_bytes_per_s: Size = int(KernelCompile.alloc_bytes_per_s)
    """Bytes of anonymous memory allocated and filled per second."""
    lifetime_s: Seconds = KernelCompile.lifetime_s
    """How long that memory lives before it is freed."""
    cache_bytes_per_s: Size = int(KernelCompile.cache_bytes_per_s)
    """Bytes the page cache grows by per second (written once, kept)."""

    def build(self) -> Workload:
        return KernelCompile(self.alloc_bytes_per_s, self.lifetime_s, self.cache_bytes_per_s)


class WriteFreeModel(_Workload):
    """Writes ``write`` bytes in blocks and frees the last ``free`` of them again (pagehint's
    KVM test guest before it migrates); acts once."""

    kind: Literal["write-free"]
    write: Size
    """Bytes allocated and written (what the guest can give, if less)."""
    free: Size = 0
    """Of those, bytes freed again (at most ``write``)."""

    @model_validator(mode="after")
    def _free_within_write(self) -> WriteFreeModel:
        if self.free > self.write:
            raise KeyProblem("free", f"{self.free} bytes is more than write ({self.write})")
        return self

    def build(self) -> Workload:
        return WriteFree(self.write, self.free)


class UsedWriterModel(_Workload):
    """Writes random pages of the blocks in use outside the kernel's, and its own kernel
    bookkeeping pages (pagehint's KVM test guest running by itself)."""

    kind: Literal["used-writer"]
    pages_per_s: PerSecond
    """Pages written per second."""
    kernel_pages: Count = 0
    """Kernel pages written with every batch of writes."""

    def build(self) -> Workload:
        return UsedWriter(self.pages_per_s, self.kernel_pages)


WorkloadModel = Annotated[
    IdleModel
    | MemoryHogModel
    | SteadyWriterModel
    | KernelCompileModel
    | WriteFreeModel
    | UsedWriterModel,
    Field(discriminator="kind"),
]
_WORKLOAD_MODELS: dict[str, type[_Workload]] = {
    "idle": IdleModel,
    "memory-hog": MemoryHogModel,
    "steady-writer": SteadyWriterModel,
    "kernel-compile": KernelCompileModel,
    "write-free": WriteFreeModel,
    "used-writer": UsedWriterModel,
}
WORKLOADS = tuple(_WORKLOAD_MODELS)


# -- the link and the migration -----------------------------------------------------------------

_PC = PrecopyConfig()
_LINK = LinkModel()
_WIRE = WireFormat()


class LinkTable(_Model):
    """``[link]``: the link, the wire format and the migration's limits."""

    bandwidth: Rate = _LINK.bandwidth
    """Link bytes per second (default 10Gbit)."""
    scan_rate: Rate = _LINK.scan_rate
    """Bytes per second the sender reads pages to find zero pages (default 8 GB/s)."""
    setup_time: Seconds = _LINK.setup_time
    """Seconds before the first round."""
    switchover_time: Seconds = _LINK.switchover_time
    """Seconds of downtime beyond sending RAM."""
    startup_wait: Seconds = _LINK.startup_wait
    """Seconds the sender waits for a destination still starting up."""
    startup_buffer: Size = _LINK.startup_buffer
    """Stream bytes the link holds before the destination reads."""
    page_header_bytes: Count = _WIRE.page_header_bytes
    """Stream bytes before each page (QEMU's 8)."""
    zero_page_bytes: Count = _WIRE.zero_page_bytes
    """Stream bytes after a zero page's header (QEMU's fill byte)."""
    batch_header_bytes: Count = _WIRE.batch_header_bytes
    """Stream bytes before each batch of pages."""
    max_downtime: Seconds = _PC.max_downtime
    """The most the guest may be paused for the last copy (default 300 ms)."""
    iteration_time: PositiveSeconds = _PC.iteration_time
    """How often convergence is checked while sending (QEMU's 100 ms)."""
    max_rounds: PositiveCount = _PC.max_rounds
    """Rounds after which completion is forced."""
    batch_pages: PositiveCount = _PC.batch_pages
    """Pages taken per send step."""


class MigrationTable(_Model):
    """``[migration]``: the hinting strategy and postcopy."""

    strategy: Literal["safe", "qemu"] = _PC.strategy
    """safe: re-protect the whole log before a hint window opens; qemu: QEMU's lazy clear."""
    postcopy: bool = _PC.postcopy
    """Postcopy possible: then QEMU does not hint, and neither does pagehint."""


def _scalar(value: Any) -> Any:
    if isinstance(value, (str, int, float)):  # bool is an int
        return value
    raise ValueError(f"must be a string, a number or a boolean, not {_show(value)}")


Scalar = Annotated[str | int | float | bool, BeforeValidator(_scalar)]


class PublishedTable(_Model):
    """``[published]``: figures a paper reported, to compare with."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Scalar] = Field(init=False)

    source: str = ""
    """Where the figures come from."""
    total_time_off_ms: Annotated[float, Field(gt=0)] | None = None
    """Total migration time without hints, ms."""
    total_time_on_ms: Annotated[float, Field(gt=0)] | None = None
    """Total migration time with hints, ms."""


class ScenarioDocument(_Model):
    """A scenario file: a guest, what it ran before, what it runs during migration, the
    link."""

    name: str | None = None
    """The scenario's name (default: the file's stem)."""
    description: str = ""
    published: PublishedTable = PublishedTable()
    guest: GuestTable = GuestTable()
    history: list[WorkloadModel] = []
    """Workloads run to completion before the migration, in order."""
    workload: WorkloadModel = IdleModel(kind="idle")
    """What the guest runs during the migration."""
    link: LinkTable = LinkTable()
    migration: MigrationTable = MigrationTable()


# -- errors in one line -------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _tables(loc: Sequence[str | int]) -> tuple[tuple[str | int, ...], str]:
    """The location without pydantic's union tags, and as a TOML key path:
    ``[guest] memory``, ``[[history]] #2 size``, ``[workload] pages_per_s``."""
    clean: list[str | int] = []
    parts: list[str] = []
    i = 0
    while i < len(loc):
        item = loc[i]
        clean.append(item)
        if i == 0 and item == "history" and i + 1 < len(loc) and isinstance(loc[i + 1], int):
            index = loc[i + 1]
            clean.append(index)
            parts.append(f"[[history]] #{int(index) + 1}")
            i += 2
            if i < len(loc) and loc[i] in _WORKLOAD_MODELS:
                i += 1  # the union's tag
            continue
        if i == 0 and item == "workload" and i + 1 < len(loc) and loc[i + 1] in _WORKLOAD_MODELS:
            parts.append("[workload]")
            i += 2
            continue
        if i == 0 and item in ScenarioDocument.model_fields and item not in ("name", "description"):
            parts.append(f"[{item}]" if item != "history" else "[[history]]")
        else:
            parts.append(str(item))
        i += 1
    return tuple(clean), " ".join(parts)


def _allowed(loc: tuple[str | int, ...], doc: Mapping[str, Any]) -> list[str]:
    """The keys the table at ``loc`` takes."""
    model: type[BaseModel] | None = ScenarioDocument
    table = loc[:-1]
    if table and table[0] in ("workload", "history"):
        raw: Any = doc.get(str(table[0]))
        if table[0] == "history" and len(table) > 1 and isinstance(raw, list):
            raw = raw[int(table[1])] if int(table[1]) < len(raw) else None
        kind = raw.get("kind") if isinstance(raw, dict) else None
        model = _WORKLOAD_MODELS.get(kind) if isinstance(kind, str) else None
    elif table:
        field = ScenarioDocument.model_fields.get(str(table[0]))
        ann = field.annotation if field is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model is not None else []


def _bound(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _message(err: Mapping[str, Any]) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    shown = _show(value)
    if kind == "missing":
        return "missing (required)"
    if kind == "bool_type":
        return f"must be true or false, not {shown}"
    if kind == "int_type":
        return f"must be an integer, not {shown}"
    if kind == "float_type":
        return f"must be a number, not {shown}"
    if kind == "string_type":
        return f"must be a string, not {shown}"
    if kind == "finite_number":
        return f"must be a finite number, not {shown}"
    if kind == "greater_than":
        return f"must be more than {_bound(ctx['gt'])}, not {shown}"
    if kind == "greater_than_equal":
        return f"must be at least {_bound(ctx['ge'])}, not {shown}"
    if kind == "less_than_equal":
        return f"must be at most {_bound(ctx['le'])}, not {shown}"
    if kind == "less_than":
        return f"must be less than {_bound(ctx['lt'])}, not {shown}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, not {shown}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a table, not {shown}"
    if kind == "list_type":
        return f"must be an array of tables ([[...]]), not {shown}"
    if kind == "union_tag_invalid":
        return f"kind {ctx['tag']!r} is not a workload: one of {', '.join(WORKLOADS)}"
    if kind == "union_tag_not_found":
        return f"a workload needs a kind: one of {', '.join(WORKLOADS)}"
    if kind == "value_error":
        return str(ctx["error"])
    msg: str = err["msg"]
    return msg


def _located(err: Mapping[str, Any]) -> tuple[str | int, ...]:
    loc: tuple[str | int, ...] = tuple(err["loc"])
    error = (err.get("ctx") or {}).get("error")
    if isinstance(error, KeyProblem):
        loc = (*loc, error.key)
    return loc


def _one_line(
    e: ValidationError,
    doc: Mapping[str, Any],
    source: str,
    options: Mapping[tuple[str | int, ...], str],
    prefix: tuple[str | int, ...] = (),
) -> str:
    errors = e.errors()
    first = errors[0]
    loc, path = _tables((*prefix, *_located(first)))
    message = _message(first)
    if first["type"] == "extra_forbidden":
        allowed = _allowed(loc, doc)
        message = "unknown key" + (f" (this table takes {', '.join(allowed)})" if allowed else "")
    # The longest option prefix of the location names a command-line override.
    for n in range(len(loc), 0, -1):
        if loc[:n] in options:
            where = options[loc[:n]]
            if n < len(loc) and first["type"] != "extra_forbidden":
                where += f": {loc[-1]}"
            break
    else:
        where = ": ".join(x for x in (source, path) if x)
    more = len(errors) - 1
    return f"{where}: {message}" + (f" (and {more} more)" if more else "")


def validate_document(
    doc: Mapping[str, Any],
    *,
    source: str,
    options: Mapping[tuple[str | int, ...], str] | None = None,
) -> ScenarioDocument:
    """The document checked against the model; ``ScenarioError`` (one line: ``source``, the
    key path and what is wrong) if it is not valid. ``options`` names the command-line
    options that set keys (``("guest", "memory")``: ``--memory 1P``): their errors name the
    option instead."""
    try:
        return ScenarioDocument.model_validate(doc)
    except ValidationError as e:
        raise ScenarioError(_one_line(e, doc, source, options or {})) from None


_WORKLOAD_ADAPTER: TypeAdapter[_Workload] = TypeAdapter(WorkloadModel)


def validate_workload(kind: str, params: Mapping[str, Any]) -> _Workload:
    """A workload's parameters checked against its model, by themselves (whether its sizes
    fit a guest is the scenario's question); ``ScenarioError`` naming the key."""
    doc = {"workload": {"kind": kind, **params}}
    try:
        return _WORKLOAD_ADAPTER.validate_python(doc["workload"])
    except ValidationError as e:
        raise ScenarioError(_one_line(e, doc, "", {}, ("workload",))) from None


def scenario_json_schema() -> dict[str, Any]:
    """The scenario file format as a JSON schema (draft 2020-12)."""
    return ScenarioDocument.model_json_schema(mode="validation")
