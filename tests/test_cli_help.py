"""Every ``tokenwire`` subcommand's ``--help`` renders.

argparse formats a help string with ``%``, so a stray percent sign in a default shown in a help text
(e.g. a cross-traffic spec such as ``rate=120%``) crashes ``--help`` with a traceback, and only when a
user asks for help. Walking the whole parser tree catches it for every command at once.
"""

from __future__ import annotations

import argparse

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


def test_an_output_path_that_cannot_be_written_is_a_clear_error(tmp_path, capsys):
    from tokenwire.daemon.cli import main

    data = tmp_path / "d.npz"
    assert main(["predictor", "collect", "--down-trace", "6mbps", "--seconds", "2", "--out", str(data)]) == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "eval.json"  # its folder would have to be a regular file
    assert main(["predictor", "eval", "--data", str(data), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"tokenwire predictor: error: {blocker}: " in err and "Traceback" not in err
