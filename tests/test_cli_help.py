"""Every ``tokenwire`` subcommand's ``--help`` renders.

argparse formats a help string with ``%``, so a stray percent sign in a default shown in a help text
(e.g. a cross-traffic spec such as ``rate=120%``) crashes ``--help`` with a traceback, and only when a
user asks for help. Walking the whole parser tree catches it for every command at once.
"""

from __future__ import annotations

import argparse
import os
import stat

import pytest

from tokenwire.daemon.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, (*path, name))


def test_every_subcommand_help_renders():
    seen = []
    for path, parser in _walk(build_parser()):
        text = parser.format_help()
        assert text.startswith("usage: tokenwire"), path
        for action in parser._actions:
            if action.help and action.help is not argparse.SUPPRESS and action.option_strings:
                # a flag's help must be in the page (not swallowed by a formatting error)
                assert action.option_strings[-1] in text, (path, action.option_strings)
        seen.append(" ".join(path))
    # the walk reached the nested steps, not only the top level
    assert "predictor collect" in seen and "predictor collect-many" in seen and "bench predictor" in seen


def test_an_output_path_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    from tokenwire.daemon.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "sq.json"  # its folder would have to be a regular file
    argv = ["testbed", "swiftqueue", "--virtual", "--down-trace", "12mbps", "--policies", "l4s", "--seconds", "30"]
    assert main([*argv, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tokenwire testbed swiftqueue: error: --json {out}: cannot write there ({blocker}: ")
    namespaces = [a for a in argv if a != "--virtual"]  # --keep is the namespace run's (refused with --virtual)
    monkeypatch.chdir(tmp_path)  # ok/ is below the current directory: a folder the command may make
    assert main([*namespaces, "--plot", "ok/p.png", "--keep", str(blocker)]) == 2  # a dir
    assert "--keep" in capsys.readouterr().err
    assert not (tmp_path / "ok").exists()  # checked, nothing made


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--json", "a-folder", "is a folder; name a file"),  # was found only after the run
    ("--plot", "a-folder", "is a folder; name a file"),
    ("--plot", "plot", "name the file with a plot format's extension"),  # matplotlib wrote plot.png
    ("--plot", "plot.txt", "name the file with a plot format's extension"),  # a ValueError after the run
])
def test_an_output_that_is_a_folder_or_no_plot_format_is_refused_before_the_run(tmp_path, capsys, option, value,
                                                                                message):
    from tokenwire.daemon.cli import main

    (tmp_path / "a-folder").mkdir()
    target = tmp_path / value
    argv = ["sim", "--tokens", "20", "--schemes", "stream"] if option == "--json" else \
        ["testbed", "swiftqueue", "--virtual", "--down-trace", "12mbps", "--policies", "l4s", "--seconds", "30"]
    assert main([*argv, option, str(target)]) == 2
    err = capsys.readouterr().err
    assert f"error: {option} {target}: {message}" in err, err


def test_json_results_carry_null_not_nan(tmp_path):
    import json

    from tokenwire.daemon.cli import write_json

    write_json({"stall": float("nan"), "rows": [1.0, float("inf")], "ok": 0.5}, tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"stall": None, "rows": [1.0, None], "ok": 0.5}


def test_a_json_result_that_fails_to_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    """Every command's --json wrote in place: a write failing half-way (a full disk, Ctrl-C) left a truncated
    file where the previous result was."""
    import errno
    import json
    from pathlib import Path

    from tokenwire.daemon.cli import save_json, write_json

    path = tmp_path / "r.json"
    write_json({"run": 1}, path)
    real = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_json({"run": 2, "rows": list(range(100))}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    save_json(path, {"a": [1, float("nan")]}, indent=None)
    assert path.read_text() == '{"a":[1,null]}\n'


def test_json_output_writes_through_what_is_not_a_regular_file(tmp_path, capsys):
    """The atomic rename put a regular file in place of a FIFO, a device (as root: /dev/null) or a symlink."""
    import json
    import threading

    from tokenwire.daemon.cli import save_json

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    save_json(fifo, {"a": 1})
    reader.join(10)
    assert json.loads(got[0]) == {"a": 1} and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    target = tmp_path / "real.json"
    target.write_text("{}")
    (tmp_path / "link.json").symlink_to(target)
    save_json(tmp_path / "link.json", {"b": 2})
    assert (tmp_path / "link.json").is_symlink() and json.loads(target.read_text()) == {"b": 2}
    save_json("-", {"c": 3})
    assert json.loads(capsys.readouterr().out) == {"c": 3}


def test_a_json_write_error_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """A full disk or a file-size limit while writing --json was an OSError traceback (it named no file)."""
    import errno
    from pathlib import Path

    from tokenwire.daemon.cli import main

    real = Path.write_text

    def too_big(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            raise OSError(errno.EFBIG, "File too large")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", too_big)
    out = tmp_path / "r.json"
    assert main(["sim", "--tokens", "20", "--runs", "1", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {out}: File too large" in err and "Traceback" not in err, err


def test_a_file_error_inside_a_command_is_one_line_and_other_os_errors_still_raise(tmp_path, capsys, monkeypatch):
    import errno

    from tokenwire.daemon.cli import main
    from tokenwire.predictor import cli as predictor_cli

    monkeypatch.setattr(predictor_cli, "_eval", lambda args: (tmp_path / "gone" / "x.npz").read_bytes())
    assert main(["predictor", "eval", "--data", "x.npz"]) == 2
    err = capsys.readouterr().err
    assert err == f"tokenwire predictor eval: error: {tmp_path / 'gone' / 'x.npz'}: No such file or directory\n"

    def socket_trouble(args):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(predictor_cli, "_eval", socket_trouble)
    with pytest.raises(OSError):  # not about a file the user named: a traceback, as for any bug
        main(["predictor", "eval", "--data", "x.npz"])


@pytest.mark.parametrize(("argv", "message"), [
    (["kv", "eval", "--text", "TEXT", "--prefix", "0"], "--prefix: expected an integer >= 1"),  # loaded SmolLM2 first
    (["kv", "eval", "--text", "TEXT", "--threads", "0"], "--threads: expected an integer >= 1"),  # a torch traceback
    (["kv", "bench", "--repeats", "0"], "--repeats: expected an integer >= 1"),  # "no median for empty data"
    (["kv", "bench", "--tokens", "-1"], "--tokens: expected an integer >= 1"),
    (["kv", "calibrate", "--text", "TEXT", "--samples", "0"], "--samples: expected an integer >= 1"),  # NaN offsets
    (["bench", "predictor", "--calls", "0"], "--calls: expected an integer >= 1"),  # a ZeroDivisionError
    (["bench", "transport", "--tokens", "-5"], "--tokens: expected an integer >= 1"),  # ran
    (["bench", "emulator", "--seconds", "-1"], "--seconds: expected a number > 0"),  # printed NaN delays
    (["bench", "emulator", "--delay-ms", "-5"], "--delay-ms: expected a number >= 0"),  # a traceback
    (["testbed", "kv", "--virtual", "--down-trace", "8mbps", "--workers", "-1"], "--workers: expected an integer"),
])
def test_counts_and_rates_are_checked_before_a_command_runs(tmp_path, capsys, argv, message):
    from tokenwire.daemon.cli import main

    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    with pytest.raises(SystemExit) as exc:
        main([str(text) if a == "TEXT" else a for a in argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_kv_calibrate_refuses_a_key_bias_past_the_step_codes(tmp_path, capsys):
    from tokenwire.daemon.cli import main

    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    assert main(["kv", "calibrate", "--text", str(text), "--key-bias", "-99"]) == 2
    assert "--key-bias must be within +-63" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["tokenwire.transport.client", "tokenwire.transport.server"])
def test_the_sdk_examples_answer_help(module):
    """`python -m ... --help` used to ignore its arguments and run the example (the client asked 127.0.0.1)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python -m {module}")


def test_no_parser_takes_abbreviated_options(capsys):
    """`chat --server X` used to be read as `--server-name X`, leaving the address at its default."""
    from tokenwire.daemon.cli import main

    assert all(not parser.allow_abbrev for _, parser in _walk(build_parser()))
    with pytest.raises(SystemExit) as exc:
        main(["chat", "--server", "example.org", "hi"])
    assert exc.value.code == 2 and "unrecognized arguments: --server" in capsys.readouterr().err



@pytest.mark.parametrize("command", ["eval", "bench", "calibrate"])
def test_kv_commands_say_a_text_that_is_not_utf8_in_one_line(tmp_path, capsys, command):
    from tokenwire.daemon.cli import main

    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\xff\xfe")
    assert main(["kv", command, "--text", str(binary)]) == 2  # was a UnicodeDecodeError traceback
    assert f"cannot read {binary}: not UTF-8 text (byte 2)" in capsys.readouterr().err


def test_new_token_prints_a_toml_line_for_any_name_and_refuses_an_empty_one(capsys):
    import tomllib
    from pathlib import Path

    from tokenwire.daemon.cli import main
    from tokenwire.daemon.config import parse_config

    example = (Path(__file__).parent.parent / "systemd" / "tokenwire.toml.example").read_text()
    config = example
    for name in ('al"ice', "a\\b", "zoë"):
        assert main(["config", "new-token", "--name", name]) == 0
        snippet = "\n".join(capsys.readouterr().out.splitlines()[2:])
        assert tomllib.loads(snippet)["auth"]["tokens"][0]["name"] == name  # was `name = "al"ice"`: not TOML
        config += "\n" + snippet + "\n"  # appended as printed, one after another: it was a second `tokens =`
    assert [t.name for t in parse_config(tomllib.loads(config)).auth.tokens] == ['al"ice', "a\\b", "zoë"]
    assert main(["config", "new-token", "--name", ""]) == 2
    assert "--name: a non-empty name" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["cert", "--out-dir", "unused", "--days", "3000000"], "at most 36500"),  # an OverflowError
    # a ConfigError traceback
    (["demo", "--link", "relay", "--rate", "1e9"], "--rate 1e+09 must be a number of tokens/s in [0.1, 10000]"),
    (["demo", "--link", "relay", "--delay-ms", "60000"], "--delay-ms 60000 must be in [0, 10000]"),
    # every session failed, NaN in JSON
    (["bench", "daemon", "--rate", "20000"], "--rate 20000 must be a number of tokens/s in [0.1, 10000]"),
    (["demo", "--link", "netns", "--rate-mbps", "fast"], "--rate-mbps: "),  # a TraceError traceback
])
def test_out_of_range_values_are_one_line(argv, message, capsys):
    from tokenwire.daemon.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_demos_link_rate_takes_a_bare_number_as_mbits():
    """``--rate-mbps 12`` was read as a trace file named "12"."""
    from tokenwire.daemon.demo_cli import link_rate

    assert link_rate("12") == "12mbps" and link_rate(" 0.5 ") == "0.5mbps"
    assert link_rate("500kbps") == "500kbps"


def test_the_demo_says_more_when_chatterbox_stalled_more():
    import argparse

    from tokenwire.daemon.demo_cli import format_results

    row = {"longest_stall_ms": 100.0, "ttft_ms": 200.0, "p99_token_delay_ms": 50.0, "tokens": 10,
           "bytes_down": 1000, "digest_verified": True}
    text = format_results({"chatterbox": {**row, "stall_ratio": 0.3}, "stream": {**row, "stall_ratio": 0.2}},
                          argparse.Namespace())
    assert "Chatterbox spent 50% more time stalled" in text  # it said "-50% less"
    text = format_results({"chatterbox": {**row, "stall_ratio": 0.1}, "stream": {**row, "stall_ratio": 0.2}},
                          argparse.Namespace())
    assert "Chatterbox spent 50% less time stalled" in text
    text = format_results({"chatterbox": {**row, "stall_ratio": 0.014}, "stream": {**row, "stall_ratio": 0.014}},
                          argparse.Namespace())
    assert "stalled as much on this link" in text and "0% less" not in text  # --loss none


def test_the_demo_table_shows_a_scheme_that_rendered_nothing():
    """A scheme that rendered no token has no stall ratio, TTFT or delays (None): formatting it raised."""
    import argparse

    from tokenwire.daemon.demo_cli import format_results

    row = {"longest_stall_ms": None, "ttft_ms": None, "p99_token_delay_ms": None, "tokens": 0,
           "bytes_down": 0, "digest_verified": False, "stall_ratio": None}
    text = format_results({"chatterbox": row}, argparse.Namespace())
    line = next(ln for ln in text.splitlines() if ln.startswith("chatterbox"))
    assert line.split()[1:3] == ["-", "-"] and "MISMATCH" in line


def test_a_rewritten_json_result_keeps_its_permissions(tmp_path):
    """The atomic replace made a result the user had made private (0600) world-readable again."""
    from tokenwire.daemon.cli import save_json

    path = tmp_path / "r.json"
    save_json(path, {"run": 1})
    path.chmod(0o600)
    save_json(path, {"run": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and '"run": 2' in path.read_text()


def test_backend_help_says_what_each_testbed_command_runs_on():
    """``kv`` and ``contention`` refuse ``--backend kernel`` (they read the emulator's packet log): their help must not
    describe the kernel-qdisc probe that ``up`` and ``compare`` make."""
    pages = {" ".join(path): parser for path, parser in _walk(build_parser())}
    for name in ("testbed kv", "testbed contention"):
        (action,) = [a for a in pages[name]._actions if "--backend" in a.option_strings]
        assert "kernel is refused" in action.help and "netem" not in action.help, name
    for name in ("testbed up", "testbed compare"):
        (action,) = [a for a in pages[name]._actions if "--backend" in a.option_strings]
        assert "netem+dualpi2" in action.help, name
