"""What the destination of a live KVM migration reports back (the ``REPORT`` record), in a
module of its own: ``pagehint.kvm`` imports it without importing ``pagehint.kvm.destination``,
which ``python -m`` then runs once (runpy warns, on stderr, when the module it is asked to run
was imported already, and the destination's stderr is one line for the source's log)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pagehint.migration.stream import StreamError


@dataclass(frozen=True)
class DestinationReport:
    """What the destination saw and what its guest said (the ``REPORT`` record)."""

    pages_received: int
    """Pages the PAGES records carried (a page sent in several rounds counts each time)."""
    bytes_received: int
    """Bytes of the whole stream read, headers and state included."""
    digest_seconds: float
    """Time spent digesting the received RAM before the guest resumed (verification only:
    not part of a real switchover)."""
    resume_seconds: float
    """From END read to the vCPUs running, digests excluded."""
    steps: int
    """Steps of the source's run that the guest finished here (0 if it was not in one)."""
    bad_pages: int
    bad_state: int
    hint_state: str | None
    """The restored device's hinting state (``done`` after a migration with hints)."""
    hinted_after_done: int
    """Blocks the guest still held hinted after taking the device's news (0 expected)."""
    free_blocks: int
    rehinted: int
    """Blocks the guest hinted in a new round on this device."""
    check_after_rehint_ok: bool

    @property
    def ok(self) -> bool:
        """The guest's own verdict: every page it uses holds what it last wrote, its allocator
        and ring add up, before and after hinting on the destination."""
        return self.bad_pages == 0 and self.bad_state == 0 and self.check_after_rehint_ok

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> DestinationReport:
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            raise StreamError(f"a REPORT has exactly the keys {sorted(names)}: {d!r:.200}")
        return cls(**d)
