"""Every KVM struct size, field offset, ioctl number and constant that ``pagehint.kvm.uapi``
uses, checked against the machine's ``<linux/kvm.h>`` by a C program gcc builds now."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from pagehint.kvm import uapi

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64",
    reason=f"the KVM uapi here is x86_64's, not {platform.machine()}",
)

STRUCTS = {
    "kvm_userspace_memory_region": uapi.KvmUserspaceMemoryRegion,
    "kvm_dirty_log": uapi.KvmDirtyLog,
    "kvm_clear_dirty_log": uapi.KvmClearDirtyLog,
    "kvm_enable_cap": uapi.KvmEnableCap,
    "kvm_regs": uapi.KvmRegs,
    "kvm_segment": uapi.KvmSegment,
    "kvm_dtable": uapi.KvmDtable,
    "kvm_sregs": uapi.KvmSregs,
    "kvm_dirty_gfn": uapi.KvmDirtyGfn,
    "kvm_fpu": uapi.KvmFpu,
    "kvm_vcpu_events": uapi.KvmVcpuEvents,
}
RUN_FIELDS = {
    "RUN_IMMEDIATE_EXIT": "immediate_exit",
    "RUN_EXIT_REASON": "exit_reason",
    "RUN_IO_DIRECTION": "io.direction",
    "RUN_IO_SIZE": "io.size",
    "RUN_IO_PORT": "io.port",
    "RUN_IO_COUNT": "io.count",
    "RUN_IO_DATA_OFFSET": "io.data_offset",
    "RUN_MMIO_PHYS_ADDR": "mmio.phys_addr",
    "RUN_MMIO_DATA": "mmio.data",
    "RUN_MMIO_LEN": "mmio.len",
    "RUN_MMIO_IS_WRITE": "mmio.is_write",
    "RUN_INTERNAL_SUBERROR": "internal.suberror",
    "RUN_FAIL_ENTRY_REASON": "fail_entry.hardware_entry_failure_reason",
}
NAMES = [n for n in dir(uapi) if (n.startswith("KVM_") and n != "KVM_API_VERSION") or n == "KVMIO"]


def c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for cname, cls in STRUCTS.items():
        lines.append(f'  printf("sizeof {cname} %zu\\n", sizeof(struct {cname}));')
        for field, *_ in cls._fields_:
            lines.append(
                f'  printf("offsetof {cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));'
            )
    for name, path in RUN_FIELDS.items():
        lines.append(f'  printf("run {name} %zu\\n", offsetof(struct kvm_run, {path}));')
    for name in NAMES:
        lines.append(f'  printf("const {name} %llu\\n", (unsigned long long)({name}));')
    lines.append('  printf("const KVM_API_VERSION %d\\n", KVM_API_VERSION);')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot read <linux/kvm.h>")
    if not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("<linux/kvm.h> is not installed (Debian: linux-libc-dev)")
    work = tmp_path_factory.mktemp("uapi")
    src, exe = work / "uapi.c", work / "uapi"
    src.write_text(c_program())
    subprocess.run([gcc, "-O0", "-o", str(exe), str(src)], check=True, timeout=120)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60)
    facts: dict[str, int] = {}
    for line in out.stdout.splitlines():
        kind, name, value = line.split()
        facts[f"{kind} {name}"] = int(value)
    return facts


@pytest.mark.parametrize("cname", sorted(STRUCTS))
def test_struct_sizes_and_offsets_match_the_header(
    cname: str, header_facts: dict[str, int]
) -> None:
    cls = STRUCTS[cname]
    assert ctypes.sizeof(cls) == header_facts[f"sizeof {cname}"]
    for field, *_ in cls._fields_:
        assert getattr(cls, field).offset == header_facts[f"offsetof {cname}.{field}"], field


def test_kvm_run_offsets_match_the_header(header_facts: dict[str, int]) -> None:
    for name in RUN_FIELDS:
        assert getattr(uapi, name) == header_facts[f"run {name}"], name


def test_ioctl_numbers_and_constants_match_the_header(header_facts: dict[str, int]) -> None:
    assert len(NAMES) > 30
    for name in [*NAMES, "KVM_API_VERSION"]:
        assert getattr(uapi, name) == header_facts[f"const {name}"], name
