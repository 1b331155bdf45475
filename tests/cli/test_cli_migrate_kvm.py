"""``pagehint migrate-kvm``: a real live migration of the test guest, hints off and on, with
the guest's verdict; its options refused in one line; a machine without KVM is exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pagehint.cli import main
from pagehint.cli import migrate_kvm as cli_migrate_kvm
from pagehint.kvm import KvmUnavailable

SMALL = ["--memory", "64M", "--write-blocks", "6", "--free-blocks", "4"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["migrate-kvm", "--no-progress", *args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.usefixtures("kvm")
@pytest.mark.parametrize("log_mode", ["classic", "manual", "ring"])
def test_json_gives_both_runs_and_the_guests_verdict(
    capsys: pytest.CaptureFixture[str], log_mode: str
) -> None:
    status, out, err = run(capsys, *SMALL, "--log-mode", log_mode, "--json")
    assert (status, err) == (0, "")
    d: dict[str, Any] = json.loads(out)
    off, on = d["hints-off"], d["hints-on"]
    for r in (off, on):
        assert r["status"] == "completed" and r["lost-pages"] == 0
        check = r["guest-check"]
        assert (check["bad-pages"], check["bad-state"], check["ok"]) == (0, 0, True)
        assert check["rehinted-blocks"] > 0  # the balloon works on the destination
        assert r["guest-steps"] > 0 and r["ram"]["remaining"] == 0
        # The destination received the whole stream: the pages, state and end.
        assert r["destination"]["stream-bytes"] > r["ram"]["transferred"]
    assert not off["free-page-hinting"] and on["free-page-hinting"]
    assert (off["guest-check"]["hint-state"], on["guest-check"]["hint-state"]) == ("stop", "done")
    assert on["pages-skipped"] > 0 and off["pages-skipped"] == 0
    assert on["ram"]["transferred"] < off["ram"]["transferred"]
    assert d["reduction"]["transferred"] == pytest.approx(
        1 - on["ram"]["transferred"] / off["ram"]["transferred"]
    )


@pytest.mark.usefixtures("kvm")
def test_the_table_has_the_figures_and_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *SMALL)
    assert status == 0
    text = " ".join(out.split())
    for label in (
        "transferred (MiB)",
        "pages skipped by hints",
        "lost pages",
        "guest's check: bad pages",
        "64 MiB guest on /dev/kvm, manual log",
    ):
        assert label in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory", "3M"], "--memory must be a multiple of 8 MiB"),
        (["--memory", "lots"], "not a size"),
        (["--write-blocks", "2", "--free-blocks", "3"], "cannot exceed --write-blocks"),
        (["--pages-per-step", "-1"], "--pages-per-step must not be negative"),
        (["--bandwidth", "fast"], "not a rate"),
        # --plot is checked before the runs (they would take seconds, then fail to write).
        (["--plot", "/nonexistent-dir/out.png"], "no directory '/nonexistent-dir'"),
        (["--plot", "out.xyz"], "matplotlib writes no 'xyz' files"),
        (["--downtime", "soon"], "not a duration"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    status, out, err = run(capsys, *args)
    assert status == 2 and out == ""
    assert err.startswith("pagehint migrate-kvm: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_a_machine_without_kvm_is_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_kvm(*args: object, **kw: object) -> None:
        raise KvmUnavailable("cannot open /dev/kvm: No such file or directory")

    monkeypatch.setattr(cli_migrate_kvm, "Vm", no_kvm)
    status, out, err = run(capsys, *SMALL)
    assert status == 2 and out == ""
    assert "cannot run a KVM guest here: cannot open /dev/kvm" in err


@pytest.mark.usefixtures("kvm")
def test_plot_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "kvm.png"
    # No suffix: matplotlib writes PNG to NAME.png, and the command says so.
    status, out, _ = run(capsys, *SMALL, "--plot", str(tmp_path / "kvm"))
    assert status == 0 and "plot written to" in out
    assert str(png) in "".join(out.split())  # the path, however the console wrapped it
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
