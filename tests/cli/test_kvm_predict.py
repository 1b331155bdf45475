"""``pagehint.cli.kvm_predict``: ``migrate-kvm``'s options as the model's parameters, the
comparison table, and ``pagehint migrate-kvm --predict`` printing the runs against the
prediction."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
from rich.console import Console

from helpers import MIB, migrate_kvm_options
from pagehint.cli import main
from pagehint.cli.kvm_predict import kvm_run_params, prediction_table
from pagehint.migration.stream import STREAM_WIRE
from pagehint.sim.kvm_model import KvmRunParams, compare, predict_kvm_run


def options(**kw: Any) -> argparse.Namespace:
    small = {
        "memory": "64M",
        "log_mode": "ring",
        "strategy": "qemu",
        "bandwidth": "1GiB",
        "downtime": "200ms",
        "write_blocks": 6,
        "free_blocks": 4,
        "pages_per_step": 8,
        "bandwidth_bps": float(1 << 30),
        "downtime_s": 0.2,
    }
    return migrate_kvm_options(**{**small, **kw})


def test_the_options_become_the_models_parameters() -> None:
    p = kvm_run_params(options(), rate=123.0)
    assert p == KvmRunParams(
        wire=STREAM_WIRE,
        memory=64 * MIB,
        block_bytes=4 * MIB,
        write_blocks=6,
        free_blocks=4,
        pages_per_step=8,
        step_rate=123.0,
        bandwidth=float(1 << 30),
        max_downtime=0.2,
        log_mode="ring",
        strategy="qemu",
        batch_pages=256,
    )
    assert kvm_run_params(options()).step_rate is None
    late = kvm_run_params(options(), sender_rate=100.0 * MIB, startup_wait=0.25)
    assert (late.sender_rate, late.startup_wait) == (100.0 * MIB, 0.25)


def test_the_table_has_every_figure_measured_and_predicted() -> None:
    p = predict_kvm_run(KvmRunParams(step_rate=400.0))
    console = Console(record=True, width=120)
    console.print(prediction_table("a title", compare(p.off, p.on, p)))
    text = console.export_text()
    for label in (
        "a title",
        "transferred (MiB)",
        "pages skipped by hints",
        "total time (ms)",
        "downtime (ms)",
        "dirty syncs",
        "54,272",
        "+0.0%",
    ):
        assert label in text


@pytest.mark.usefixtures("kvm")
def test_migrate_kvm_predict_json_compares_the_runs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["migrate-kvm", "--no-progress", "--memory", "64M", "--write-blocks", "6"]
    assert main([*argv, "--free-blocks", "4", "--log-mode", "manual", "--predict", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["prediction"]
    for run in ("hints-off", "hints-on"):
        measured = d["measured-params"][run]
        assert measured["step-rate"] > 0 and measured["sender-rate"] > 0
        assert measured["startup-wait"] >= 0
    figures = {(f["figure"], f["hints"]): f for f in d["figures"]}
    skipped = figures[("pages_skipped", True)]
    assert skipped["measured"] > 0 and skipped["predicted"] > 0
    assert figures[("transferred", False)]["measured"] > figures[("transferred", True)]["measured"]


@pytest.mark.usefixtures("kvm")
def test_migrate_kvm_predict_prints_the_comparison(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["migrate-kvm", "--no-progress", "--memory", "64M", "--write-blocks", "6"]
    assert main([*argv, "--free-blocks", "4", "--predict"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the simulator's prediction of these runs" in text
    for word in ("measured", "predicted", "difference", "steps/s", "transferred (MiB)"):
        assert word in text
