"""The simulated world: a Linux-faithful guest (``guest``) with its virtio-balloon driver
(``driver``, over ``driver_ring``), page contents (``contents``), a simulated KVM dirty log
(``dirty_log``), workloads (``workloads``), the guest as a migration source with a destination
that keeps contents for the nothing-lost oracle (``source``), simulated time (``link``), and
the scenarios ``pagehint simulate`` runs (``scenario``, ``scenarios/``), and the model of a
``pagehint migrate-kvm`` run (``kvm_model``)."""

from pagehint.sim.contents import PageContents
from pagehint.sim.dirty_log import DirtyLog
from pagehint.sim.driver import DriverStep, LinuxBalloonDriver, RoundResult, run_until_idle
from pagehint.sim.driver_ring import DriverSplitRing
from pagehint.sim.guest import FREE, HINT_BLOCK_BYTES, HINTED, PAGE_POISON, USED, SimulatedGuest
from pagehint.sim.link import LinkModel, SimulatedLink
from pagehint.sim.scenario import (
    WORKLOADS,
    Scenario,
    ScenarioError,
    WorkloadSpec,
    load_scenario,
    parse_rate,
    parse_seconds,
    parse_size,
    read_scenario,
    reduction,
    run_scenario,
    scenario_from_dict,
    scenario_to_dict,
    scenario_to_toml,
    shipped_scenarios,
)
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

__all__ = [
    "DEVICE_RATE",
    "FREE",
    "GUEST_HINT_RATE",
    "HINTED",
    "HINT_BLOCK_BYTES",
    "PAGE_POISON",
    "USED",
    "WORKLOADS",
    "DirtyLog",
    "DriverSplitRing",
    "DriverStep",
    "Idle",
    "KernelCompile",
    "LinkModel",
    "LinuxBalloonDriver",
    "MemoryHog",
    "PageContents",
    "RoundResult",
    "Scenario",
    "ScenarioError",
    "SimulatedDestination",
    "SimulatedGuest",
    "SimulatedLink",
    "SimulatedSource",
    "SteadyWriter",
    "UsedWriter",
    "Workload",
    "WorkloadSpec",
    "WriteFree",
    "load_scenario",
    "parse_rate",
    "parse_seconds",
    "parse_size",
    "read_scenario",
    "reduction",
    "run_scenario",
    "run_until_idle",
    "scenario_from_dict",
    "scenario_to_dict",
    "scenario_to_toml",
    "shipped_scenarios",
]
