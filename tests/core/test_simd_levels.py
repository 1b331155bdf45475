"""Every kernel level this CPU has gives the model's results (each in its own process, forced
with PAGEHINT_SIMD); bad or unsupported PAGEHINT_SIMD values make the import fail clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pagehint

LEVELS = ["scalar", "avx2", "avx512", "neon"]
HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "simd_differential.py"
TIMEOUT = 300

# The child reports an import failure as "<ExceptionType>: <message>" and exits 3.
IMPORT_PROBE = """
import sys
try:
    import pagehint
except BaseException as e:
    print(f"{type(e).__name__}: {e}")
    sys.exit(3)
print("imported", pagehint.simd_level())
"""


def run_child(args: list[str], simd: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PAGEHINT_SIMD", None)
    if simd is not None:
        env["PAGEHINT_SIMD"] = simd
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=HERE,
    )


def test_available_levels_are_sane() -> None:
    available = pagehint.available_simd_levels()
    assert isinstance(available, list)
    assert available, "no level at all"
    assert available[0] == "scalar", "the baseline must come first"
    assert len(set(available)) == len(available)
    assert set(available) <= set(LEVELS)
    assert pagehint.simd_level() in available


def test_default_level_is_an_available_one() -> None:
    out = run_child(
        [
            "-c",
            "import pagehint; print(pagehint.simd_level()); "
            "print(*pagehint.available_simd_levels())",
        ],
        None,
    )
    assert out.returncode == 0, out.stderr
    level, available = out.stdout.splitlines()
    assert level in available.split()
    assert available.split() == pagehint.available_simd_levels()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("seed", [1, 2])
def test_level_matches_model(level: str, seed: int) -> None:
    available = pagehint.available_simd_levels()
    if level not in available:
        pytest.skip(f"this CPU lacks {level} (available: {', '.join(available)})")
    out = run_child([str(SCRIPT), level, str(seed), "6000"], level)
    assert out.returncode == 0, f"{level} differs from the model:\n{out.stdout}\n{out.stderr}"
    assert f"{level}: " in out.stdout


@pytest.mark.parametrize("level", LEVELS)
def test_forced_level_is_reported(level: str) -> None:
    available = pagehint.available_simd_levels()
    if level not in available:
        pytest.skip(f"this CPU lacks {level} (available: {', '.join(available)})")
    out = run_child(
        [
            "-c",
            "import pagehint; print(pagehint.simd_level()); "
            "print(*pagehint.available_simd_levels())",
        ],
        level,
    )
    assert out.returncode == 0, out.stderr
    got, listed = out.stdout.splitlines()
    assert got == level
    # Forcing a level does not change what the CPU can do.
    assert listed.split() == available


@pytest.mark.parametrize("level", LEVELS)
def test_unsupported_level_fails_import(level: str) -> None:
    available = pagehint.available_simd_levels()
    if level in available:
        pytest.skip(f"{level} is available on this CPU, so forcing it is not an error")
    out = run_child(["-c", IMPORT_PROBE], level)
    assert out.returncode == 3, (
        f"import with PAGEHINT_SIMD={level} did not fail:\n{out.stdout}{out.stderr}"
    )
    message = out.stdout
    assert level in message, message
    assert "PAGEHINT_SIMD" in message, message
    assert "lack" in message or "not supported" in message or "unsupported" in message, message


@pytest.mark.parametrize("value", ["bogus", "AVX3", "sse9", "scalar,avx2"])
def test_unknown_level_fails_import(value: str) -> None:
    out = run_child(["-c", IMPORT_PROBE], value)
    assert out.returncode == 3, (
        f"import with PAGEHINT_SIMD={value!r} did not fail:\n{out.stdout}{out.stderr}"
    )
    message = out.stdout
    assert value in message, message
    assert "PAGEHINT_SIMD" in message, message
