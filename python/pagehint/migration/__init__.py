"""Pre-copy live migration: the loop (``precopy``, policy only), the link and clock it runs on
(``link``), the runs of pages a batch sends (``runs``) and the QMP-named result (``result``).
Nothing here knows the simulator."""

from pagehint.migration.link import Link, WallClockLink, WireFormat
from pagehint.migration.precopy import (
    LogMode,
    MigrationCancelled,
    MigrationDestination,
    MigrationSource,
    Precopy,
    PrecopyConfig,
    Strategy,
)
from pagehint.migration.result import MigrationResult, Progress, RoundStats, Status
from pagehint.migration.runs import PageRuns, expand_runs

__all__ = [
    "Link",
    "LogMode",
    "MigrationCancelled",
    "MigrationDestination",
    "MigrationResult",
    "MigrationSource",
    "PageRuns",
    "Precopy",
    "PrecopyConfig",
    "Progress",
    "RoundStats",
    "Status",
    "Strategy",
    "WallClockLink",
    "WireFormat",
    "expand_runs",
]
