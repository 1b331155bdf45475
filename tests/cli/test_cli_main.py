"""The ``pagehint`` command itself: ``--version``, Ctrl-C, and a bad ``PAGEHINT_SIMD`` are
each one line."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest

import pagehint
from pagehint.cli import info, main


def test_version_names_the_package_version_and_the_simd_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out == f"pagehint {pagehint.__version__} (SIMD level {pagehint.simd_level()})\n"


def test_ctrl_c_is_one_line_and_exit_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    status = main(["info"])
    out, err = capsys.readouterr()
    assert (status, out, err) == (130, "", "pagehint: interrupted\n")


@pytest.mark.parametrize(
    "command",
    [["pagehint", "info"], [sys.executable, "-m", "pagehint", "info"]],
    ids=["script", "python -m"],
)
def test_a_bad_pagehint_simd_is_one_line_and_exit_2(command: list[str]) -> None:
    if command[0] == "pagehint":
        script = shutil.which("pagehint", path=os.path.dirname(sys.executable))
        if script is None:
            pytest.skip("the pagehint script is not installed beside this Python")
        command = [script, *command[1:]]
    env = {**os.environ, "PAGEHINT_SIMD": "bogus"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.startswith('pagehint: PAGEHINT_SIMD="bogus" is not a level'), out.stderr
    assert len(out.stderr.splitlines()) == 1


def test_a_library_import_with_a_bad_pagehint_simd_still_raises_value_error() -> None:
    probe = "import pagehint"
    env = {**os.environ, "PAGEHINT_SIMD": "bogus"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1].startswith("ValueError: PAGEHINT_SIMD=")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "pagehint: the following arguments are required: command (see pagehint --help)"),
        (["fly"], "pagehint: argument command: invalid choice: 'fly'"),
        (["simulate", "--memory"], "pagehint simulate: argument --memory: expected one argument"),
        (["migrate-kvm", "--log-mode", "x"], "pagehint migrate-kvm: argument --log-mode: invalid"),
        (["simulate", "--bogus"], "pagehint: unrecognized arguments: --bogus"),
    ],
)
def test_a_command_line_argparse_refuses_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    assert (exit_.value.code, out) == (2, "")
    assert err.startswith(message) and err.count("\n") == 1, err
