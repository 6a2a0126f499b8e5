"""Fixes from a fresh-eyes audit of the README, the docs and the CLI (session 41): a broken in-page link, stale
simulator numbers, an upstream's HTML error page shown as its raw markup, config errors in Python's spelling,
range errors that named four options at once, help text (the defaults' spelling, words split by the wrapping,
``--help`` to a full disk) and the demo relay's port."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import free_udp_port
from tokenwire.daemon.cli import build_parser, main
from tokenwire.daemon.config import ConfigError, load_config
from tokenwire.transport.errors import ErrorCode

from .test_upstream_fixes2 import Canned, failure

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "tokenwire.daemon.cli"]


# --------------------------------------------------------------------------- 1. links and anchors in *.md
LINK = re.compile(r"\[[^\[\]]*\]\(([^()\s]+)\)")  # [text](target) and ![alt](image); the text may wrap lines
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> str:
    """``text`` without its code blocks and code spans (blanked, so that line numbers hold)."""
    out, fenced = [], False
    for line in text.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else re.sub(r"`[^`]*`", lambda m: " " * len(m.group()), line))
    return "\n".join(out)


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives ``path``'s headings: lower case, punctuation dropped, spaces as hyphens, and a
    repeated one numbered (-1, -2, ...)."""
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").split("\n"):  # (code spans count: `tokenwire-kv/1`)
        if FENCE.match(line):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def broken_links(root: Path) -> list[str]:
    """``file:line: why`` for each relative link under ``root``'s *.md files whose file or #anchor is missing."""
    bad = []
    for md in sorted(root.rglob("*.md")):
        if {"build", ".venv", "node_modules"} & set(md.relative_to(root).parts):
            continue
        text = _prose(md.read_text(encoding="utf-8"))
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            where = f"{md.relative_to(root)}:{text.count(chr(10), 0, m.start()) + 1}"
            if not dest.exists():
                bad.append(f"{where}: no file {file_part}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{where}: no anchor #{anchor} in {dest.relative_to(root)}")
    return bad


def test_every_relative_link_and_anchor_in_the_markdown_resolves():
    """docs/protocol.md linked `#token-packets`; the heading "Token packets (Chatterbox)" is
    `#token-packets-chatterbox`."""
    assert broken_links(ROOT) == []


def test_the_link_check_finds_a_missing_anchor_file_and_image(tmp_path):
    (tmp_path / "a.md").write_text("# Token packets (Chatterbox)\n\n## Token packets (Chatterbox)\n\nsee [item\n"
                                   "8](#token-packets), [ok](#token-packets-chatterbox-1), [b](b.md#x), "
                                   "![img](img/x.png), [web](https://example.com/#y)\n\n```\n[code](#nope)\n```\n")
    (tmp_path / "b.md").write_text("# X\n")
    assert broken_links(tmp_path) == ["a.md:5: no anchor #token-packets in a.md", "a.md:6: no file img/x.png"]


# ------------------------------------------------------------------------------ 2. README simulator table
def _readme_row(spec: str) -> list[str]:
    row = next(line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
               if line.startswith(f"| {spec} "))
    return [cell.strip() for cell in row.strip("|").split("|")]


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "label"), [("iid:0.05", "iid 5 %"), *((s, s) for s in ("ge:0.002,0.04",
                                                                                         "ge:0.0005,0.01",
                                                                                         "ge:0.001,0.005"))])
def test_the_readme_simulator_rows_are_what_sim_prints(spec, label, tmp_path, capsys):
    """Rows 3-4 said −44.4 % / 1.00 and −24.8 % where `tokenwire sim --loss SPEC --runs 5` prints 43.9 % lower,
    an own-oracle ratio of 1.01, and 24.9 %; duplicate's 0.102 at ge:0.002,0.04 is 0.100 (the simulator is
    deterministic: each row is the mean of seeds 1-5, rounded once)."""
    assert main(["sim", "--loss", spec, "--runs", "5", "--json", str(tmp_path / "s.json")]) == 0
    capsys.readouterr()
    doc = json.loads((tmp_path / "s.json").read_text())
    ch, st, du = (doc["schemes"][s]["stall_ratio"] for s in ("chatterbox", "stream", "duplicate"))
    oracle = doc["schemes"]["chatterbox"]["oracle_stall_ratio"]
    _, *cells = _readme_row(label)
    assert cells == [f"{ch:.3f}", f"{st:.3f}", f"{du:.3f}", f"−{(1 - ch / st) * 100:.1f} %", f"{ch / oracle:.2f}"]


def test_a_loss_free_slow_link_has_the_stall_floor_the_readme_gives(capsys):
    """README: waiting for a 1-Mbit/s link's next delivery slot counts as stall, 0.14 for every scheme."""
    assert main(["sim", "--tokens", "50", "--down-trace", "1mbps", "--delay-ms", "40", "--schemes",
                 "chatterbox,stream"]) == 0
    rows = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()[2:4]}
    assert rows == {"chatterbox": ["0.1408", "0.1408"], "stream": ["0.1408", "0.1408"]}
    assert "--down-trace 1mbps --delay-ms 40`: 0.14 for every scheme" in " ".join(
        (ROOT / "README.md").read_text(encoding="utf-8").split())


# ------------------------------------------------------------------------- 3. an upstream's HTML error page
PY_501 = (http.server.DEFAULT_ERROR_MESSAGE % {"code": 501, "message": "Unsupported method ('POST')",
                                                 "explain": "Server does not support this operation."}).encode()
NGINX_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
             b"</center>\r\n<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n")


def test_python_http_servers_501_page_is_its_title_and_message_not_its_markup():
    """`tokenwire chat` printed `HTTP 501: <!DOCTYPE HTML>\\n<html lang="en">\\n    <head>...`, cut off before
    the page said anything."""
    err = failure(Canned([PY_501], status=501, headers={"Content-Type": "text/html;charset=utf-8"}))
    assert err.code == ErrorCode.UPSTREAM_ERROR
    assert str(err).startswith("upstream 'vllm': HTTP 501, text/html page \"Error response\": Error code: 501 "
                               "Message: Unsupported method ('POST'). Error code explanation: 501 - Server does "
                               "not support this operation."), str(err)
    assert "<" not in str(err) and "\\n" not in str(err)


def test_a_proxys_502_page_and_a_page_without_a_content_type():
    err = failure(Canned([NGINX_502], status=502, headers={"Content-Type": "text/html", "Retry-After": "5"}))
    assert str(err) == "upstream 'vllm': HTTP 502, text/html page \"502 Bad Gateway\": nginx/1.24.0; Retry-After: 5 s"
    # another Content-Type (aiohttp's server sends application/octet-stream for none): a page by its start
    untyped = Canned([b"\n<!DOCTYPE html><title>Oops</title>"], status=500, headers={})
    assert str(failure(untyped)) == "upstream 'vllm': HTTP 500, application/octet-stream page \"Oops\""


def test_a_json_error_labelled_html_is_still_read_as_json_and_a_secret_in_a_title_is_redacted():
    body = json.dumps({"error": {"message": "model not found"}}).encode()
    assert str(failure(Canned([body], status=404, headers={"Content-Type": "text/html"}))) == \
        "upstream 'vllm': HTTP 404: model not found"
    page = Canned([b"<title>bad key sk-secret-0123456789</title><script>x='<p>'</script><p>a &amp; b</p>"],
                  status=401, headers={"Content-Type": "text/html"})
    err = failure(page, extra_headers={"X-Token": "sk-secret-0123456789"})
    assert str(err) == "upstream 'vllm': HTTP 401, text/html page \"bad key [redacted]\": a & b"


def test_a_long_page_is_cut_short_and_the_200_login_page_names_its_title():
    long = Canned([b"<html><title>T</title><p>" + b"word " * 200 + b"</p>"], status=503,
                  headers={"Content-Type": "text/html"})
    text = str(failure(long))
    assert text.startswith("upstream 'vllm': HTTP 503, text/html page \"T\": word word")
    # (a 503 is busy: the Retry-After suffix follows the cut, session 46)
    assert text.endswith("...; Retry-After: 1 s (the upstream named none)")
    assert len(text) <= len("upstream 'vllm': ") + 300
    login = Canned([b"<!doctype html><html><head><title>Sign in</title></head><body><form>Password</form>"],
                   headers={"Content-Type": "text/html"})
    assert str(failure(login)) == "upstream 'vllm': unexpected Content-Type text/html: \"Sign in\": Password"


# ------------------------------------------------------------------------------------- 4. config errors
def _load(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tw.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value).removeprefix(f"{path}:")


@pytest.mark.parametrize(("text", "said"), [
    ('[[upstreams]]\nname = "x"\n', "1: upstreams[0].type: required key missing (one of demo, openai, ingest)"),
    ('[[upstreams]]\ntype = "demo"\n', "1: upstreams[0].name: required key missing"),
    ('[[upstreams]]\ntype = "demo"\nname = ""\n', "3: upstreams[0].name: expected a non-empty string, got ''"),
    ('[[upstreams]]\ntype = "demo"\nname = "x"\nmax_tokens = true\n',
     "4: upstreams[0].max_tokens: expected an integer in [1, 1000000], got true"),
    ('[[upstreams]]\ntype = "demo"\nname = "x"\nrate = "fast"\n',
     "4: upstreams[0].rate: expected a number in [0.1, 10000], got 'fast'"),
    ('[[upstreams]]\ntype = false\nname = "x"\n',
     "2: upstreams[0].type: expected one of demo, openai, ingest, got false"),
    ('[[upstreams]]\ntype = "demo"\nname = "x"\n[[routes]]\nmodel = "*"\n',
     "4: routes[0].upstream: required key missing (one of x)"),
    ('[[upstreams]]\ntype = "demo"\nname = "x"\n[auth]\ntokens = [{name = "a"}]\n',
     "5: auth.tokens[0].sha256: required key missing (make it with `tokenwire config new-token`)"),
    ('[[upstreams]]\ntype = "demo"\nname = "x"\n[kv]\nenabled = 1\n', "5: kv.enabled: expected true or false, got 1"),
])
def test_config_errors_say_missing_and_quote_values_as_toml(tmp_path, text, said):
    """A missing type read "expected one of demo, openai, ingest, got None"; `max_tokens = true` "got True"."""
    assert _load(tmp_path, text) == said


def test_values_are_spelled_as_toml_writes_them():
    from tokenwire.daemon.config_values import toml_value

    assert [toml_value(v) for v in (True, False, 3, 1.5, float("inf"), float("-inf"), float("nan"))] == \
        ["true", "false", "3", "1.5", "inf", "-inf", "nan"]
    assert toml_value("it's") == '"it\'s"' and toml_value("a\nb") == '"a\\nb"' and toml_value("x") == "'x'"
    assert toml_value([1, "a", {"k": True, "two words": []}]) == "[1, 'a', { k = true, 'two words' = [] }]"


# ---------------------------------------------------------------------------- 5. one option per range error
@pytest.mark.parametrize(("argv", "said"), [
    (["sim", "--tokens", "0"], "tokenwire sim: error: --tokens 0 must be >= 1"),
    (["sim", "--runs", "0"], "tokenwire sim: error: --runs 0 must be >= 1"),
    (["sim", "--delay-ms", "-5"], "tokenwire sim: error: --delay-ms -5 must be >= 0"),
    (["sim", "--first-token-ms", "-1"], "tokenwire sim: error: --first-token-ms -1 must be >= 0"),
    (["demo", "--rate", "0"],
     "tokenwire demo: error: --rate 0 must be a number of tokens/s in [0.1, 10000] (the demo upstream's range)"),
    (["demo", "--delay-ms", "-1"], "tokenwire demo: error: --delay-ms -1 must be in [0, 10000]"),
    (["bench", "daemon", "--seconds", "0"], "tokenwire bench daemon: error: --seconds 0 must be > 0"),
    (["bench", "daemon", "--rate", "20000"], "tokenwire bench daemon: error: --rate 20000 must be a number of "
                                             "tokens/s in [0.1, 10000] (the demo upstream's range)"),
])
def test_a_range_error_names_the_one_option_and_its_range(argv, said, capsys):
    """`sim --tokens 0` said "--tokens and --runs must be >= 1, --delay-ms and --first-token-ms >= 0"."""
    assert main(argv) == 2
    assert capsys.readouterr().err == said + "\n"


# ------------------------------------------------------------------------------------------- 7-9. help
def _parsers(parser=None, path=()):
    parser = parser or build_parser()
    yield path, parser
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():  # type: ignore[attr-defined]
                yield from _parsers(sub, (*path, name))


def test_every_help_page_spells_defaults_one_way_and_splits_no_word(monkeypatch):
    """"(default 400)" and "(default: 400)" both appeared; predictor collect's --cross default was wrapped as
    ``...scalable*2:o`` / ``n=1,...``, a copy of it broken."""
    monkeypatch.setenv("COLUMNS", "80")
    odd = {}
    for path, parser in _parsers():
        text = parser.format_help()
        if re.search(r"\(default [^:]", " ".join(text.split())):
            odd[" ".join(path)] = re.findall(r"\(default [^:)]*\)?", " ".join(text.split()))
    assert odd == {}
    from tokenwire.predictor.crossspec import DEFAULT_CROSS

    helps = {" ".join(p): parser.format_help() for p, parser in _parsers()}
    assert f"'{DEFAULT_CROSS}'" in helps["predictor collect"]  # on one line, whole
    assert "-\n" not in "".join(helps.values())  # no word split at a hyphen (--first-token-ms)


def test_testbed_kv_text_default_names_the_shipped_file():
    helps = {" ".join(p): " ".join(parser.format_help().split()) for p, parser in _parsers()}
    assert "(default: the shipped prose_harbor.txt)" in helps["testbed kv"]
    assert "tests/data" not in helps["testbed kv"]


def test_config_example_names_its_argument_as_its_usage_does(capsys):
    """"argument file: invalid choice" while the usage showed `[{config,unit,sysusers,tmpfiles}]`, no `file`."""
    with pytest.raises(SystemExit):
        main(["config", "example", "bogus"])
    err = capsys.readouterr().err
    assert "usage: tokenwire config example [-h] [--dir] [FILE]" in err
    assert "error: argument FILE: invalid choice: 'bogus' (choose from 'config', 'unit', 'sysusers', 'tmpfiles')" in err


def test_the_sim_table_names_its_oracle_column_in_one_word(capsys):
    """`stall own oracle` read as one column or three."""
    assert main(["sim", "--tokens", "10", "--schemes", "stream"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["scheme", "stall", "own-oracle"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("argv", [["--help"], ["sim", "--help"], ["config", "example", "-h"]])
def test_help_to_a_full_stdout_fails_as_version_does(argv):
    """`tokenwire --help > /dev/full` exited 0 with nothing said (argparse ignores a failed write)."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([*CLI, *argv], stdout=full, stderr=subprocess.PIPE, timeout=60)
    prog = " ".join(["tokenwire", *[a for a in argv if not a.startswith("-")]])
    assert done.returncode == 2 and done.stderr.decode() == f"{prog}: error: stdout: No space left on device\n"


def test_help_to_a_closed_stdout_says_so_and_help_still_prints(monkeypatch, capsys):
    with pytest.raises(SystemExit) as done:
        main(["sim", "--help"])
    assert done.value.code in (0, None) and capsys.readouterr().out.startswith("usage: tokenwire sim")
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(SystemExit) as done:
        main(["sim", "--help"])
    assert done.value.code == 2 and capsys.readouterr().err == "tokenwire sim: error: stdout is closed\n"


# ----------------------------------------------------------------------------------- 10. demo --relay-port
def test_demo_relay_listens_on_relay_port(capsys):
    """The relay took a port of its own choosing: a user held to a port range could not contain the demo."""
    port = free_udp_port()
    assert main(["demo", "--link", "relay", "--relay-port", str(port), "--tokens", "5", "--schemes", "stream",
                 "--quiet", "--delay-ms", "5"]) == 0
    assert f"through a relay on udp/127.0.0.1:{port} " in capsys.readouterr().out


def test_demo_relay_port_taken_is_one_line(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        assert main(["demo", "--link", "relay", "--relay-port", str(port), "--tokens", "5", "--schemes", "stream",
                     "--quiet"]) == 2
    assert capsys.readouterr().err == (f"tokenwire demo: error: --relay-port {port}: cannot listen on "
                                       f"udp/127.0.0.1:{port}: Address already in use\n")
