"""``pagehint lost-write-kvm``: the scheduled lost write under each configuration, its
outcome against the prediction (exit 0 or 1), and exit 2 without KVM."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from helpers import completed_result
from pagehint.cli import lost_write_kvm, main
from pagehint.kvm import KvmUnavailable
from pagehint.kvm.lost_write import LostWriteRun


@pytest.mark.usefixtures("kvm")
def test_the_json_gives_each_run_and_the_outcome_is_the_predicted_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(["lost-write-kvm", "--json"])
    out, err = capsys.readouterr()
    assert (status, err) == (0, "")
    d: dict[str, Any] = json.loads(out)
    assert d["as-predicted"] is True
    runs = {(r["strategy"], r["initially-set"]): r for r in d["runs"]}
    assert set(runs) == set(lost_write_kvm.CASES)
    qemu = runs[("qemu", True)]
    assert qemu["lost-pages"] == qemu["guest-bad-pages"] == qemu["block-pages"] == 1024
    for case in (("safe", True), ("qemu", False)):
        assert (runs[case]["lost-pages"], runs[case]["guest-bad-pages"]) == (0, 0)


def test_an_outcome_other_than_predicted_is_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    result = completed_result(total_time=1.0, dirty_sync_count=1, hinting=True)
    base = LostWriteRun("qemu", True, 0x1000_0000, 1024, 1024, 1024, result)

    def fake(strategy: Any, *, initially_set: bool) -> LostWriteRun:
        # The guest found fewer bad pages than the oracle counted lost under qemu.
        bad = 1000 if (strategy, initially_set) == ("qemu", True) else 0
        lost = 1024 if (strategy, initially_set) == ("qemu", True) else 0
        return replace(
            base, strategy=strategy, initially_set=initially_set, lost_pages=lost, bad_pages=bad
        )

    monkeypatch.setattr(lost_write_kvm, "scheduled_lost_write", fake)
    status = main(["lost-write-kvm"])
    _, err = capsys.readouterr()
    assert status == 1 and "differs from the prediction" in err


def test_without_kvm_it_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(*_: Any, **__: Any) -> LostWriteRun:
        raise KvmUnavailable("cannot open /dev/kvm: No such file or directory")

    monkeypatch.setattr(lost_write_kvm, "scheduled_lost_write", unavailable)
    status = main(["lost-write-kvm"])
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert err.splitlines() == [
        "pagehint lost-write-kvm: cannot run a KVM guest here: "
        "cannot open /dev/kvm: No such file or directory"
    ]
