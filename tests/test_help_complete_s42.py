"""Every ``tokenwire`` subcommand's ``--help`` says what the command does, and every option says what it is for.

Session 41's audit found 30 subcommands whose ``--help`` was a usage line and a list of options with no word of
what the command does (``testbed kv``, ``predictor train``, ``config check``...), and 20 options with no help text
at all (``predictor train --window``, ``testbed kv --deadline-ms``, ``bench daemon --scheme``...): ``--help`` showed
them as ``--epochs EPOCHS (default: 30)``. The walk below covers the whole parser tree in-process, so an option or
a command added without its text fails here, naming it. Options hidden on purpose (``help=argparse.SUPPRESS``,
such as ``testbed up --run-id``) stay hidden and are not asked for one.
"""

from __future__ import annotations

import argparse
import re

import pytest

from tests.test_cli_help import _walk  # (the parser tree, command by command)
from tokenwire.daemon.cli import build_parser


@pytest.fixture(scope="module")
def tree() -> list[tuple[str, argparse.ArgumentParser]]:
    return [(" ".join(path), parser) for path, parser in _walk(build_parser())]


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options and positionals ``--help`` lists, without -h/--help and the subcommand list itself."""
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)]


def _name(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or str(action.metavar or action.dest)


def test_every_subcommand_has_a_description(tree):
    missing = [cmd for cmd, parser in tree if cmd and not (parser.description or "").strip()]
    assert missing == [], f"subcommands whose --help says nothing of what they do: {', '.join(missing)}"


def test_every_subcommand_has_a_line_in_its_parents_list(tree):
    missing = []
    for cmd, parser in tree:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                listed = {c.dest: c.help for c in action._choices_actions}
                missing += [f"{cmd} {name}".strip() for name in action.choices if not listed.get(name)]
    assert missing == [], f"subcommands without a line in their parent's --help: {', '.join(missing)}"


def test_every_visible_option_has_help(tree):
    missing = [f"{cmd or 'tokenwire'}: {_name(a)}" for cmd, parser in tree for a in _visible(parser)
               if not (a.help or "").strip()]
    assert missing == [], f"options without a help text: {'; '.join(missing)}"


def test_no_help_is_a_stub(tree):
    """A placeholder, or the option's name restated ("--window: window"), is no help either."""
    stubs = []
    for cmd, parser in tree:
        for a in _visible(parser):
            text = (a.help or "").strip()
            words = re.sub(r"[^a-z]", "", text.lower())
            name = re.sub(r"[^a-z]", "", (a.option_strings[-1] if a.option_strings else a.dest).lower())
            if re.search(r"\b(todo|fixme|tbd|xxx)\b", text.lower()) or (text and words == name):
                stubs.append(f"{cmd or 'tokenwire'}: {_name(a)}: {text!r}")
    assert stubs == [], f"help texts that are stubs: {'; '.join(stubs)}"


def test_every_page_renders_its_description_unsplit(tree, monkeypatch):
    """A description is wrapped as the options' help is, no word split at a hyphen (``drop-`` / ``tail``)."""
    monkeypatch.setenv("COLUMNS", "80")
    for cmd, parser in tree:
        text = parser.format_help()
        if parser.description:  # (a command without one fails the test above)
            flat = " ".join(text.split())
            first = " ".join(parser.description.split()[:6])
            assert first in flat and flat.index(first) < flat.index("options:"), cmd  # shown, above the options
        assert "-\n" not in text, cmd


def test_an_option_without_help_still_shows_its_default():
    """The formatter's fallback for an option with no help (none is left in the tree, so it is tested here)."""
    parser = argparse.ArgumentParser(prog="x", formatter_class=type(build_parser()._get_formatter()))
    parser.add_argument("--n", type=int, default=7)
    assert "--n N (default: 7)" in " ".join(parser.format_help().split())
