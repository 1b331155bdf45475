"""Fixtures and options of the benchmark suite (``python -m pytest benches``, see report.py)."""

from __future__ import annotations

import platform
from typing import Any

import bitarray
import numpy as np
import pytest

import pagehint
from benches.benchutil import QUICK_ENV, Settings, quick_from_env


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pagehint-quick",
        action="store_true",
        default=False,
        help=f"few rounds per benchmark (CI's informational run); also set by {QUICK_ENV}=1",
    )


def _quick(config: pytest.Config) -> bool:
    return bool(config.getoption("--pagehint-quick")) or quick_from_env()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
    return {
        "pagehint": pagehint.__version__,
        "simd_level": pagehint.simd_level(),
        "numpy": np.__version__,
        "bitarray": bitarray.__version__,
        "cpu": _cpu_model(),
    }


def pytest_report_header(config: pytest.Config) -> str:
    v = _versions()
    mode = "quick" if _quick(config) else "full"
    return (
        f"pagehint {v['pagehint']} (simd {v['simd_level']}), numpy {v['numpy']}, "
        f"bitarray {v['bitarray']}, cpu {v['cpu']}, mode {mode}"
    )


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    machine_info.update(_versions())
    machine_info["pagehint_bench_mode"] = "quick" if _quick(config) else "full"


@pytest.fixture(scope="session")
def settings(request: pytest.FixtureRequest) -> Settings:
    return Settings.make(_quick(request.config))
