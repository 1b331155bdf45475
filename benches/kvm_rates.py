#!/usr/bin/env python3
"""Rates of the KVM path on this machine, side by side for each dirty-log mode: exits per
second through the Python exit loop, pages per second the test guest writes, and the time to
fetch (and, in manual mode, clear) the dirty log of its RAM. Whole-operation timings of a real
VM, so it is a script, not a pytest-benchmark suite; it prints a markdown table.

    python benches/kvm_rates.py [--memory-mib 256] [--pings 2000] [--blocks 60]

Needs /dev/kvm and gcc (the test guest is built on first use); says so and exits 2 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import cast

import numpy as np

from pagehint import MemoryMap
from pagehint.kvm import GuestProgram, KvmUnavailable, Vm, VmLogMode
from pagehint.kvm.build import GuestBuildError


def measure(mode: VmLogMode, memory: int, pings: int, blocks: int) -> dict[str, float]:
    half = memory // 2
    memmap = MemoryMap([(0, half), (4 << 30, memory - half)])
    with Vm(memmap, log_mode=mode) as vm:
        guest = GuestProgram(vm, mmio_base=0xD000_0000)
        guest.start()
        guest.ping(0)
        t = time.perf_counter()
        for i in range(pings):
            guest.ping(i)
        ping_s = time.perf_counter() - t
        vm.get_dirty_log()
        vm.clear_dirty_log(0, vm.npages)
        t = time.perf_counter()
        written = guest.alloc_write(blocks)
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        log = vm.get_dirty_log()
        get_s = time.perf_counter() - t
        t = time.perf_counter()
        vm.clear_dirty_log(0, vm.npages)
        clear_s = time.perf_counter() - t
        dirty = int(np.unpackbits(log.view(np.uint8)).sum())
        return {
            "exits/s": 3 * pings / ping_s,  # each round trip: IN command, IN argument, OUT result
            "guest pages/s": written * 1024 / write_s,
            "dirty pages": dirty,
            "get ms": get_s * 1000,
            "clear ms": clear_s * 1000,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--modes", default="classic,manual,ring")
    args = parser.parse_args(argv)
    rows = []
    for name in args.modes.split(","):
        if name not in ("classic", "manual", "ring"):
            parser.error(f"unknown log mode {name!r} (classic, manual, ring)")
        mode = cast(VmLogMode, name)
        try:
            r = measure(mode, args.memory_mib << 20, args.pings, args.blocks)
        except (KvmUnavailable, GuestBuildError) as e:
            print(f"{mode}: not measured: {e}", file=sys.stderr)
            continue
        rows.append((mode, r))
    if not rows:
        return 2
    print("| log mode | exits/s | guest pages/s | dirty pages | get_dirty_log ms | clear ms |")
    print("|---|--:|--:|--:|--:|--:|")
    for mode, r in rows:
        print(
            f"| {mode} | {r['exits/s']:,.0f} | {r['guest pages/s']:,.0f} | "
            f"{r['dirty pages']:,.0f} | {r['get ms']:.2f} | {r['clear ms']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
