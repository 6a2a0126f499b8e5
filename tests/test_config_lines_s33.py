"""Config validation errors name the line of the setting (daemon/config_lines.py): "file:line: key: problem"."""
from __future__ import annotations

import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import examples
from tokenwire.daemon.config import ConfigError, load_config
from tokenwire.daemon.config_lines import error_line, setting_lines

TRICKY = '''# a comment [limits]
[server]
listen = [
  "127.0.0.1:4433",  # [kv] in a comment
  "127.0.0.1:4434",
]
"quoted.key" = 'lit [x]'

[[upstreams]]
name = "a"
notes = """
[limits]
x = 1 \\"""
"""

[[upstreams]]
name = "b"
models = { a = "b", "c" = "d" }
[upstreams.extra_headers]
X-One = "1"

[limits]
transcript_memory_mb = -5
deep.er.key = 2
'''


def test_tables_and_keys_are_found_past_strings_comments_and_multiline_arrays():
    tomllib.loads(TRICKY)  # valid TOML, or the test says nothing
    lines = setting_lines(TRICKY)
    assert lines[("server",)] == 2
    assert lines[("server", "listen")] == 3
    assert lines[("server", "quoted.key")] == 7
    assert lines[("upstreams",)] == 9
    assert lines[("upstreams", 0)] == 9
    assert lines[("upstreams", 0, "notes")] == 11
    assert lines[("upstreams", 1)] == 16
    assert lines[("upstreams", 1, "name")] == 17
    assert lines[("upstreams", 1, "extra_headers")] == 19  # under the newest [[upstreams]], not the first
    assert lines[("upstreams", 1, "extra_headers", "X-One")] == 20
    assert lines[("limits", "transcript_memory_mb")] == 23
    assert lines[("limits", "deep", "er", "key")] == 24
    assert ("limits", "x") not in lines  # written inside a string
    assert ("kv",) not in lines  # written inside a comment


@pytest.mark.parametrize(("message", "line"), [
    ("limits.transcript_memory_mb: expected a number", 23),
    ("upstreams[1].extra_headers.X-One: bad", 20),
    ("upstreams[1].type: expected one of", 16),  # left out: the table it belongs in
    ("upstreams[0]: expected a table", 9),
    ("upstreams: expected a non-empty array", 9),
    ("metrics.listen: bad", None),  # a table the file does not write
    ("server.certificate and server.private_key must be set together", None),  # names no one setting
])
def test_error_line_points_at_the_setting_or_its_table(message, line):
    assert error_line(TRICKY, message) == line


def test_load_config_names_file_and_line(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text('[server]\nlisten = ["127.0.0.1:4433"]\n\n[limits]\n# why\ntranscript_memory_mb = -5\n')
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert str(exc.value).startswith(f"{cfg}:6: limits.transcript_memory_mb: expected a number")


def test_unknown_key_in_the_third_array_entry(tmp_path):
    entry = '[[auth.tokens]]\nname = "{n}"\nsha256 = "{h}"\n'
    text = "".join(entry.format(n=f"u{i}", h=f"{i:064x}") for i in range(3)).replace(
        'name = "u2"', 'name = "u2"\ncolour = "x"')
    cfg = tmp_path / "t.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{cfg}:9: auth\.tokens\[2\]\.colour: unknown key"):
        load_config(cfg)


_KEYS = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
_VALUES = st.sampled_from([
    '1', '-2.5', 'true', '"a [b] # c"', "'lit \"x\" [y]'", '[1, 2]', '[\n  "x",  # c ]\n  "y",\n]',
    '"""\nm [t]\nk = 1\n"""', '{ a = 1, "b c" = "]" }', "'''\n#x\n'''",
])


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(st.tuples(_KEYS, st.lists(st.tuples(_KEYS, _VALUES), min_size=1, max_size=4,
                                           unique_by=lambda kv: kv[0])),
                min_size=1, max_size=4, unique_by=lambda t: t[0]),
       st.booleans())
def test_every_written_key_is_found_on_its_line(tables, comments):
    out: list[str] = []
    expected: dict[tuple, int] = {}
    for name, items in tables:
        if comments:
            out.append(f"# [{name}] x = 1")
        out.append(f"[{name}]")
        expected[(name,)] = len(out)
        for key, value in items:
            expected[(name, key)] = len(out) + 1
            out.extend(f"{key} = {value}".split("\n"))
    text = "\n".join(out) + "\n"
    tomllib.loads(text)
    lines = setting_lines(text)
    for key, line in expected.items():
        assert lines[key] == line, (key, text)


@settings(max_examples=examples(300), deadline=None)
@given(st.text(max_size=200), st.text(max_size=40))
def test_any_text_gives_a_line_in_the_file_or_none(text, message):
    line = error_line(text, message)  # must not raise, whatever the text
    assert line is None or 1 <= line <= text.count("\n") + 1
