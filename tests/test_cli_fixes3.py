"""Command-line edges a coverage pass found: a closed stderr, a removed current directory; a Ctrl-C while the
parser is built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenwire.daemon import cli

CLI = [sys.executable, "-m", "tokenwire.daemon.cli"]


@pytest.mark.parametrize("argv", [["config", "check", "/nonexistent/tokenwire.toml"],
                                  ["daemon", "--config", "/nonexistent/tokenwire.toml"],
                                  ["chat", "--insecure", "--port", "9", "--max-time", "1", "--max-tokens", "1", "hi"]],
                         ids=["config-check", "daemon", "chat"])
def test_a_closed_stderr_keeps_errors_out_of_stdout(argv: list[str], tmp_path: Path):
    """print(file=None) writes to stdout: with `2>&-`, a failed command's error line went into the output file
    (`tokenwire chat ... 2>&- > answer.txt` held "tokenwire chat: error: no QUIC handshake ...")."""
    out = tmp_path / "out.txt"
    with out.open("wb") as stdout:
        proc = subprocess.run(["bash", "-c", 'exec "$@" 2>&-', "bash", *CLI, *argv], stdout=stdout, timeout=60)
    assert proc.returncode == 2
    assert out.read_bytes() == b""


@pytest.mark.parametrize("argv", [["cert"], ["sim", "--runs", "1", "--tokens", "5", "--json", "out.json"]],
                         ids=["cert", "sim"])
def test_a_removed_current_directory_is_one_line(argv: list[str], tmp_path: Path):
    gone = tmp_path / "gone"
    gone.mkdir()
    script = f'cd {gone} && rmdir {gone} && exec "$@"'
    proc = subprocess.run(["bash", "-c", script, "bash", *CLI, *argv], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("the current directory no longer exists (it was removed): name the output "
                                        "with an absolute path, or cd to a folder that exists")
    assert os.listdir(tmp_path) == []


def test_output_folders_are_not_writable_by_others_whatever_the_umask(tmp_path: Path):
    """Under `umask 000` `tokenwire cert --out-dir new/dir` made the folders 0777: anyone could replace the key."""
    script = f'umask 000 && cd {tmp_path} && exec "$@"'
    for argv in (["cert", "--out-dir", "a/b"], ["sim", "--runs", "1", "--tokens", "5", "--json", "c/d/out.json"]):
        proc = subprocess.run(["bash", "-c", script, "bash", *CLI, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    for folder in ("a", "a/b", "c", "c/d"):
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o755, folder
    assert (tmp_path / "a/b/key.pem").stat().st_mode & 0o777 == 0o600


def test_ctrl_c_while_the_parser_imports_is_interrupted_not_a_traceback(monkeypatch, capsys):
    """The parser's type checks import aioquic and more (over 1.5 s on a loaded machine): a Ctrl-C then was a
    traceback and death by the signal, where a Ctrl-C a second later is "interrupted", exit 130."""

    def interrupted_parse(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted_parse)
    assert cli.main(["chat", "--insecure", "hello"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted"]


def test_other_parser_exits_still_raise(monkeypatch):
    """--help and usage errors are SystemExit from argparse: they keep their status."""
    with pytest.raises(SystemExit) as info:
        cli.main(["chat", "--no-such-option"])
    assert info.value.code == 2
