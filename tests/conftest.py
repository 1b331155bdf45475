"""Shared pytest set-up. ``tests/`` is on the path (``pyproject.toml``), so test files import
the shared rigs from ``helpers``; this file holds the fixtures and the hypothesis profiles."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings

from helpers import KVM_LAYOUT, KVM_MMIO_BASE, Booted
from pagehint import MemoryMap
from pagehint.kvm import GuestProgram, KvmUnavailable, Vm, VmLogMode

# CI runs the default profile; PAGEHINT_HYPOTHESIS=thorough asks for ten times the examples.
settings.register_profile("thorough", max_examples=1000)
settings.load_profile(os.environ.get("PAGEHINT_HYPOTHESIS", "default"))


@pytest.fixture
def booted() -> Iterator[Booted]:
    """``booted(log_mode)``: a VM on KVM_LAYOUT with the test guest running, closed after the
    test. Skips, saying what is missing, without /dev/kvm, a capability, gcc or objcopy."""
    made: list[Vm] = []

    def make(
        log_mode: VmLogMode = "classic",
        memmap: MemoryMap = KVM_LAYOUT,
        vcpus: int = 1,
        initially_set: bool = False,
        **guest_kw: Any,
    ) -> tuple[Vm, GuestProgram]:
        if shutil.which("gcc") is None or shutil.which("objcopy") is None:
            pytest.skip("building the test guest needs gcc and objcopy")
        try:
            vm = Vm(memmap, log_mode=log_mode, vcpus=vcpus, initially_set=initially_set)
        except KvmUnavailable as e:
            pytest.skip(str(e))
        made.append(vm)
        guest = GuestProgram(vm, mmio_base=KVM_MMIO_BASE, timeout=60, **guest_kw)
        guest.start()
        return vm, guest

    yield make
    for vm in made:
        vm.close()


@pytest.fixture
def kvm() -> None:
    """Skips, saying what is missing, unless this machine can run the test guest: gcc and
    objcopy to build it, and a usable /dev/kvm."""
    if shutil.which("gcc") is None or shutil.which("objcopy") is None:
        pytest.skip("building the test guest needs gcc and objcopy")
    try:
        Vm(KVM_LAYOUT).close()
    except KvmUnavailable as e:
        pytest.skip(str(e))
