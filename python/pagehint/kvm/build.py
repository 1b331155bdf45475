"""Builds the test guest (``guest/guest.c``) with the machine's gcc into a flat image.

The flags are what this machine's KVM runs: freestanding long-mode code without SSE
(``-mgeneral-regs-only``: an SSE instruction ends KVM_RUN with an internal error on this
nested, software-assisted KVM), no PIC, no red zone (no interrupts use the stack, but the
VMM may), linked at 1 MiB. Images are cached by the hash of the sources and flags.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

LOAD_GPA = 0x100000
"""Where the image is loaded and entered (``guest.ld``)."""

CFLAGS = [
    "-m64",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-nostdlib",
    "-mno-red-zone",
    "-O2",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-mgeneral-regs-only",
    "-fno-builtin",
    "-Wall",
    "-Werror",
    "-Wno-main",
    "-no-pie",
    "-static",
    "-Wl,--build-id=none",
]


SOURCES = ("guest.c", "boot_info.h", "guest.ld")


class GuestBuildError(RuntimeError):
    """gcc or objcopy is missing or failed; the message says which and why."""


def _source(name: str) -> bytes:
    """A file of the guest's sources, as shipped in the package."""
    return (resources.files("pagehint.kvm") / "guest" / name).read_bytes()


def cache_dir() -> Path:
    """``$PAGEHINT_CACHE``, else ``$XDG_CACHE_HOME/pagehint``, else ``~/.cache/pagehint``."""
    root = os.environ.get("PAGEHINT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pagehint"


def build_guest(cache: Path | None = None) -> bytes:
    """The guest's flat image (built now, or taken from the cache)."""
    files = {name: _source(name) for name in SOURCES}
    key = hashlib.sha256(b"".join(files.values()) + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out = (cache or cache_dir()) / f"guest-{key}.bin"
    if out.is_file():
        return out.read_bytes()
    gcc, objcopy = shutil.which("gcc"), shutil.which("objcopy")
    if gcc is None or objcopy is None:
        raise GuestBuildError("building the KVM test guest needs gcc and objcopy (binutils)")
    with tempfile.TemporaryDirectory(prefix="pagehint-guest-") as tmp:
        work = Path(tmp)
        for name, data in files.items():
            (work / name).write_bytes(data)
        elf, image = work / "guest.elf", work / "guest.bin"
        steps = [
            [gcc, *CFLAGS, "-T", str(work / "guest.ld"), "-o", str(elf), str(work / "guest.c")],
            [objcopy, "-O", "binary", str(elf), str(image)],
        ]
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                raise GuestBuildError(f"{Path(cmd[0]).name} failed: {done.stderr.strip()}")
        data = image.read_bytes()
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(data)
        partial.replace(out)  # atomic: a concurrent build writes the same bytes
    return data
