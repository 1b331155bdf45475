"""What a migration reports: per-round figures, progress, and the QMP-named result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["completed", "cancelled", "failed"]


@dataclass(frozen=True)
class RoundStats:
    """One round: from a sync to the next (round 0 starts at set-up)."""

    round: int
    start: float
    duration: float
    dirty_at_start: int
    """Pages dirty in the bitmap when the round began (after its sync)."""
    new_dirty: int
    """Pages the sync that began the round found newly dirty."""
    normal: int
    duplicate: int
    transferred: int
    pages_hinted: int
    pages_skipped: int
    """Dirty pages hints cleared from the bitmap during the round (not sent)."""


@dataclass(frozen=True)
class MigrationResult:
    """A migration's outcome, in QMP ``query-migrate`` terms plus pagehint's own."""

    status: Status
    total_time: float
    downtime: float
    setup_time: float
    ram_total: int
    transferred: int
    duplicate: int
    normal: int
    normal_bytes: int
    dirty_sync_count: int
    remaining: int
    hinting: bool
    pages_hinted: int
    pages_skipped: int
    rounds: list[RoundStats] = field(default_factory=list)
    lost_pages: int | None = None
    """Pages the destination got wrong (None if the source cannot tell)."""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """QMP ``query-migrate`` names (times in ms, sizes in bytes) plus pagehint's."""
        out: dict[str, Any] = {
            "status": self.status,
            "total-time": round(self.total_time * 1000, 3),
            "downtime": round(self.downtime * 1000, 3),
            "setup-time": round(self.setup_time * 1000, 3),
            "ram": {
                "transferred": self.transferred,
                "total": self.ram_total,
                "duplicate": self.duplicate,
                "normal": self.normal,
                "normal-bytes": self.normal_bytes,
                "dirty-sync-count": self.dirty_sync_count,
                "remaining": self.remaining,
            },
            "free-page-hinting": self.hinting,
            "pages-hinted": self.pages_hinted,
            "pages-skipped": self.pages_skipped,
            "lost-pages": self.lost_pages,
            "rounds": [{k.replace("_", "-"): v for k, v in asdict(r).items()} for r in self.rounds],
        }
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class Progress:
    """Passed to the progress callback after every send step: seconds on the link's clock,
    the round, pages still dirty, pages dirty when the round began, pages sent so far, guest
    pages."""

    time: float
    round: int
    remaining: int
    round_dirty: int
    sent: int
    npages: int
