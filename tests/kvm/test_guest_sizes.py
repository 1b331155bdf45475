"""The test guest at sizes where its state outgrows one 4 MiB block: the kernel keeps as
many blocks as ``kernel_bytes_for`` says, never frees or rewrites them, and checks itself."""

from __future__ import annotations

import numpy as np

from helpers import GIB, MIB, Booted
from pagehint import MemoryMap
from pagehint.kvm.guest_program import USED, kernel_bytes_for


def two_slots(memory: int) -> MemoryMap:
    return MemoryMap([(0, memory // 2), (4 << 30, memory // 2)])


def test_the_kernel_grows_with_the_page_versions_it_keeps() -> None:
    sizes = [kernel_bytes_for(two_slots(m)) for m in (128 * MIB, 1 * GIB, 2 * GIB, 4 * GIB)]
    assert sizes == [4 * MIB, 4 * MIB, 8 * MIB, 8 * MIB]
    # A version (4 bytes) per page is most of the state: 8 GiB of pages need 8 MiB of them.
    assert kernel_bytes_for(MemoryMap([(0, 2 * GIB), (4 << 30, 6 * GIB)])) == 12 * MIB


def test_a_2_gib_guest_keeps_two_kernel_blocks_and_checks_itself(booted: Booted) -> None:
    _, guest = booted(memmap=two_slots(2 * GIB))
    assert guest.boot_info().kernel_bytes == 8 * MIB
    assert guest.alloc_write(5) == 5
    assert guest.free(100) == 5  # only what it allocated: the kernel's two blocks stay
    assert guest.alloc_write(3) == 3 and guest.write_pages(500, seed=2) == 500
    gpas, state, _ = guest.blocks()
    assert np.count_nonzero(state == USED) == 2 + 3
    assert all(state[gpas < 8 * MIB] == USED)
    check = guest.selfcheck()
    assert check.ok, check
