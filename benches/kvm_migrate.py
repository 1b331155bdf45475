#!/usr/bin/env python3
"""Live migrations of the running KVM test guest, hints off and on, in each dirty-log mode.

The guest writes 50 blocks and frees 40 of them (stale data in free memory), then runs by
itself (rewriting pages, taking hinting rounds) while ``Precopy`` sends over a 512 MiB/s
wall-clock link to a second VM, whose copy then checks every page it holds. Prints a
markdown table; needs /dev/kvm and gcc (exit status 2 without them).

    python benches/kvm_migrate.py [--modes classic,manual,ring]
"""

from __future__ import annotations

import argparse
import sys
from typing import cast

from pagehint import MemoryMap
from pagehint.device import FreePageHintDevice, VirtioMmioTransport
from pagehint.kvm import GuestProgram, KvmDestination, KvmSource, KvmUnavailable, Vm, VmLogMode
from pagehint.kvm.build import GuestBuildError
from pagehint.migration import MigrationResult, Precopy, PrecopyConfig, WallClockLink

MIB = 1 << 20
MMIO_BASE = 0xD000_0000
MEMMAP = MemoryMap([(0, 128 * MIB), (4 << 30, 128 * MIB)])


def migrate(mode: VmLogMode, hints: bool) -> tuple[MigrationResult, int]:
    """One migration; returns its result and the bad pages the destination's copy found."""
    with Vm(MEMMAP, log_mode=mode) as vm:
        guest = GuestProgram(vm, mmio_base=MMIO_BASE)
        guest.start()
        device = FreePageHintDevice(vm.ram, MEMMAP)
        device.guest_write = vm.mark_dirty
        transport = VirtioMmioTransport(device)
        vm.add_mmio(MMIO_BASE, transport.size, transport)
        guest.probe()
        guest.alloc_write(50)
        guest.free(40)
        guest.run(pages_per_step=32, seed=1)
        source = KvmSource(vm, guest, transport)
        destination = KvmDestination(MEMMAP, mmio_base=MMIO_BASE)
        try:
            link = WallClockLink(512 * MIB)
            result = Precopy(source, destination, link, PrecopyConfig(hints=hints)).run()
            copy = destination.resume(source)
            copy.collect()
            return result, copy.selfcheck().bad_pages
        finally:
            destination.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="classic,manual,ring")
    args = parser.parse_args(argv)
    print(
        "| log mode | hints | total ms | downtime ms | transferred MiB | normal pages "
        "| zero pages | pages skipped by hints | bad pages (guest's check) |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for name in args.modes.split(","):
        if name not in ("classic", "manual", "ring"):
            parser.error(f"unknown log mode {name!r}")
        for hints in (False, True):
            try:
                r, bad = migrate(cast(VmLogMode, name), hints)
            except (KvmUnavailable, GuestBuildError) as e:
                print(f"not measured: {e}", file=sys.stderr)
                return 2
            print(
                f"| {name} | {'on' if hints else 'off'} | {r.total_time * 1000:,.0f} | "
                f"{r.downtime * 1000:.1f} | {r.transferred / MIB:,.1f} | {r.normal:,} | "
                f"{r.duplicate:,} | {r.pages_skipped:,} | {bad} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
