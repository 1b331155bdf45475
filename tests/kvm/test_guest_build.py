"""The test guest builds with the machine's gcc, and the VMM's view of its boot info
(``BootInfo``) is the C struct's layout, field by field."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from pagehint.kvm import build, guest_program
from pagehint.kvm.guest_program import BOOT_INFO_GPA, BOOT_MAGIC, BootInfo

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("objcopy") is None,
    reason="building the test guest needs gcc and objcopy",
)


def test_the_guest_builds_once_and_comes_from_the_cache(tmp_path: Path) -> None:
    image = build.build_guest(tmp_path)
    cached = list(tmp_path.glob("guest-*.bin"))
    assert len(cached) == 1 and cached[0].read_bytes() == image
    assert 1000 < len(image) < 0x100000  # code and data below the state at 2 MiB
    assert build.build_guest(tmp_path) == image


def test_a_missing_compiler_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(build.GuestBuildError, match="needs gcc and objcopy"):
        build.build_guest(tmp_path)


def test_boot_info_matches_the_c_header(tmp_path: Path) -> None:
    header = (resources.files("pagehint.kvm") / "guest" / "boot_info.h").read_text()
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "typedef unsigned int u32; typedef unsigned long long u64;",
        header,
        "int main(void) {",
        '  printf("sizeof %zu\\n", sizeof(struct boot_info));',
        '  printf("const_gpa %llu\\n", BOOT_INFO_GPA);',
        '  printf("const_magic %llu\\n", BOOT_MAGIC);',
        '  printf("const_ap_entry %llu\\n", (unsigned long long)AP_ENTRY_OFFSET);',
        '  printf("const_ap_area %llu\\n", AP_AREA_GPA);',
        '  printf("const_ap_pages %llu\\n", (unsigned long long)AP_PAGES);',
        '  printf("const_ap_stack %llu\\n", AP_STACK_TOP);',
    ]
    for field, *_ in BootInfo._fields_:
        lines.append(f'  printf("{field} %zu\\n", offsetof(struct boot_info, {field}));')
    lines += ["  return 0;", "}"]
    src, exe = tmp_path / "bi.c", tmp_path / "bi"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, timeout=120)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60)
    facts = dict(line.split() for line in out.stdout.splitlines())
    assert int(facts["sizeof"]) == ctypes.sizeof(BootInfo)
    assert int(facts["const_gpa"]) == BOOT_INFO_GPA and int(facts["const_magic"]) == BOOT_MAGIC
    assert int(facts["const_ap_entry"]) == guest_program.AP_ENTRY_OFFSET
    assert int(facts["const_ap_area"]) == guest_program.AP_AREA_GPA
    assert int(facts["const_ap_pages"]) == guest_program.AP_PAGES
    assert int(facts["const_ap_stack"]) == guest_program.AP_STACK_TOP
    for field, *_ in BootInfo._fields_:
        assert getattr(BootInfo, field).offset == int(facts[field]), field
