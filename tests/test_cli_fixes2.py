"""The ``tokenwire`` command and the daemon's configuration: what a probe of the CLI found.

Malformed URLs that ``config check`` passed and the daemon's start crashed on, stdout that cannot be written
(closed, a full disk), a Redis store without its package, an ``api_key_file`` folder, a chat answer or prompt
outside the locale's encoding, empty folders left by refused runs, ``--version``, ``-v`` and the daemon,
error prefixes and hints, defaults in ``--help``, the SDK server on a busy port, empty ``[kv]`` strings.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenwire.daemon.cli import build_parser, installed_version, main
from tokenwire.daemon.config import ConfigError, load_config
from tokenwire.transport.server import serve
from tokenwire.transport.tls import make_self_signed

from .test_chat_cli import closed, stop_loop_thread

PIECES = ["h\u00e9llo", " \u4e16\u754c", " \U0001f389", " done"]
CLI = [sys.executable, "-m", "tokenwire.daemon.cli"]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, list[str]]]:
    """A tokenwire server (dev certificate) answering with non-ASCII pieces; yields its port and the prompts
    it received (the last message of each request)."""
    prompts: list[str] = []

    async def source(request):
        prompts.append(request.messages[-1]["content"])
        for piece in PIECES:
            yield piece

    loop = asyncio.new_event_loop()
    holder: dict = {}

    async def start() -> None:
        holder["server"] = await serve(source, host="127.0.0.1", port=0)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    yield holder["server"].port, prompts
    stop_loop_thread(loop, thread, lambda: closed(holder["server"]))  # (its UDP socket and loop closed, not leaked)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokenwire.toml"
    path.write_text(text)
    return path


def _openai(url: str, extra: str = "") -> str:
    return f'[[upstreams]]\nname = "o"\ntype = "openai"\nbase_url = "{url}"\n{extra}'


def _run(argv: list[str], *, env: dict[str, str] | None = None, input: bytes | None = None
         ) -> subprocess.CompletedProcess:
    """The CLI in a process of its own (another environment, or what its exit does), its output captured."""
    return subprocess.run([*CLI, *argv], capture_output=True, env=env, input=input, timeout=120)


# ------------------------------------------------------------------------------------- 1. URLs in the config
@pytest.mark.parametrize(("url", "words"), [
    ("http://127.0.0.1:99999/v1", "not a valid URL (check the host and port"),
    ("http://host:-1/v1", "not a valid URL"),
    ("http://host:abc/v1", "not a valid URL"),
    ("http://[::1/v1", "not a valid URL"),
    ("http://:80/v1", "not a valid URL"),
    ("http://", "no host in the URL"),
    ("https://", "no host in the URL"),
    ("http://a b/v1", "contains a space"),
    ("http://h:0/v1", "port 0 is no server's port"),
    ("http://%zz/v1", "'%zz' is not a host name or address"),
    ("http://h/v1?x=1", "no ?query or #fragment"),
])
def test_a_malformed_base_url_is_a_config_error(tmp_path, url, words):
    """Each passed `config check`; the daemon's start then crashed with a ValueError traceback (upstream_openai's
    URL(...)), or every request failed."""
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.base_url: ") as caught:
        load_config(_config(tmp_path, _openai(url)))
    assert words in str(caught.value), caught.value


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "https://api.example.com/v1/", "http://user@host/v1",
                                 "http://[::1]:8000/v1", "http://\u00e9.example/v1", "http://my_vllm:8000/v1"])
def test_a_good_base_url_still_loads(tmp_path, url):
    cfg = load_config(_config(tmp_path, _openai(url)))
    assert cfg.upstreams[0].options["base_url"] == url.rstrip("/")


@pytest.mark.parametrize(("url", "words"), [
    ("redis://h:99999/0", "not a valid URL (check the host and port"),
    ("redis://h:0/0", "port 0"),
    ("redis://h /0", "contains a space"),
    ("unix://", "no socket path"),
])
def test_a_malformed_redis_url_is_a_config_error(tmp_path, url, words):
    """`redis://h:99999/0` passed `config check`; the daemon refused it at start."""
    with pytest.raises(ConfigError, match=r"kv\.redis_url: ") as caught:
        load_config(_config(tmp_path, f'[kv]\nbackend = "redis"\nredis_url = "{url}"\n'))
    assert words in str(caught.value), caught.value


def test_a_url_error_quotes_no_piece_of_its_password(tmp_path):
    """A '#' or '/' in a password ends the host part early: the parser's words ("Port could not be cast to integer
    value as 'Sup3rS3cret'") went into the error, and so to the daemon's log."""
    with pytest.raises(ConfigError) as caught:
        load_config(_config(tmp_path, _openai("https://apiuser:Sup3rS3cret#1@api.example.com/v1")))
    assert "Sup3r" not in str(caught.value) and "percent-encoded" in str(caught.value)
    for url in ("redis://:Sup3rS3cret#1@redis:6379/0", "redis://default:pa/ss@redis:6379/0"):
        with pytest.raises(ConfigError) as caught:
            load_config(_config(tmp_path, f'[kv]\nbackend = "redis"\nredis_url = "{url}"\n'))
        assert "Sup3r" not in str(caught.value) and "'pa'" not in str(caught.value), caught.value


# ------------------------------------------------------------------------------------------- 2. stdout errors
def test_a_closed_stdout_is_an_error_not_a_lost_token(monkeypatch, capsys):
    """`config new-token >&-` exited 0 with the token printed nowhere (print() to None writes nothing)."""
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["config", "new-token"]) == 2
    assert capsys.readouterr().err.startswith("tokenwire config new-token: error: stdout is closed")


def test_a_closed_stdout_does_not_stop_the_daemon_check(monkeypatch, capsys, tmp_path):
    """The daemon writes its logs to stderr: it may run with stdout closed (it gets past the stdout check and
    fails here on its configuration instead)."""
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["daemon", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("argv", [["config", "new-token"], ["sim", "--tokens", "5"], ["sim", "--tokens", "5",
                                                                                     "--json", "-"]])
def test_a_full_stdout_is_one_line_naming_stdout(monkeypatch, capsys, argv):
    """`> /dev/full` was an OSError traceback (sim, chat, `--json -`)."""
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"tokenwire {' '.join(argv[:2 if argv[0] == 'config' else 1])}: error: stdout: No space "
                        "left on device\n"), err


def test_the_daemon_runs_and_stops_cleanly_with_stdout_and_stdin_closed(tmp_path):
    """A daemon started with `>&- <&-` had a socket on descriptor 1 (the lowest free one), and uvloop aborted
    it at its exit ("uv__close: Assertion `fd > STDERR_FILENO' failed", SIGABRT)."""
    import signal

    config = _config(tmp_path, '[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n')
    proc = subprocess.Popen(["bash", "-c", 'exec "$@" >&- <&-', "bash", *CLI, "daemon", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True)
    with proc:  # (its stderr pipe closed at the end: left open, it was a ResourceWarning)
        try:
            lines = []
            for line in proc.stderr:  # (until it listens: the line comes once its sockets are open)
                lines.append(line)
                if "listening on" in line:
                    break
            assert any("listening on" in line for line in lines), lines
            proc.send_signal(signal.SIGTERM)
            rest = proc.stderr.read()
            assert proc.wait(60) == 0, [*lines, rest]
            assert "Assertion" not in rest and "stopped" in rest, rest
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_stdout_exits_2_without_a_traceback_from_a_process():
    """And the process exits 2 with the one line: the interpreter's final flush of what stdout still held does
    not fail again (exit status 120, "Exception ignored")."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*CLI, "config", "new-token"], stdout=full, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.decode() == "tokenwire config new-token: error: stdout: No space left on device\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_chat_to_a_full_stdout_is_one_line(server, monkeypatch, capsys):
    port, _ = server
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        assert main(["chat", "--port", str(port), "--insecure", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == "tokenwire chat: error: stdout: No space left on device\n", err


def test_chat_with_stdout_closed_is_refused_before_it_asks(server, monkeypatch, capsys):
    """`tokenwire chat ... >&-` was an AttributeError traceback ('NoneType' has no attribute 'write')."""
    port, prompts = server
    before = len(prompts)
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["chat", "--port", str(port), "--insecure", "hi"]) == 2
    assert capsys.readouterr().err.startswith("tokenwire chat: error: stdout is closed")
    assert len(prompts) == before  # nothing was asked of the server


# ------------------------------------------------------------------------------ 3. the redis extra missing
@pytest.fixture
def no_redis(tmp_path) -> Path:
    """A folder that, first on PYTHONPATH, makes `import redis` fail as without the package."""
    shim = tmp_path / "noredis" / "redis"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'redis\'", name="redis")\n')
    return shim.parent


def _redis_config(tmp_path: Path) -> Path:
    return _config(tmp_path, '[server]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = ""\n[kv]\nenabled = true\n'
                             'listen = "127.0.0.1:0"\nbackend = "redis"\nredis_url = "redis://127.0.0.1:1/0"\n')


def test_config_check_reports_the_missing_redis_package(tmp_path, monkeypatch, capsys):
    """`config check` said ok of a Redis store the daemon then could not open (no `redis` package)."""
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ModuleNotFoundError
    assert main(["config", "check", str(_redis_config(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "kv.backend: the Redis store needs the redis package, which is not installed" in err, err


def test_the_daemon_without_redis_fails_as_one_json_line_and_v_is_said_to_not_apply(tmp_path, no_redis):
    """Under --log-format json the refusal was a plain text line among JSON ones (a log shipper parses each);
    and `tokenwire -v daemon` changed nothing without a word."""
    env = {**os.environ, "PYTHONPATH": f"{no_redis}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = _run(["-v", "daemon", "--config", str(_redis_config(tmp_path)), "--log-format", "json"], env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.decode().splitlines()]  # every line is JSON
    assert lines[-1]["level"] == "critical" and "needs redis, from the 'redis' extra" in lines[-1]["msg"], lines
    assert any("-v does not change the daemon's log level" in line["msg"] for line in lines), lines


# ---------------------------------------------------------------------------------- 4. api_key_file a folder
def test_an_api_key_file_that_is_a_folder_is_refused(tmp_path):
    """It passed with a misleading "readable by other users" warning, and every request failed reading it."""
    with pytest.raises(ConfigError, match=rf"upstreams\[0\]\.api_key_file: {tmp_path} is a folder"):
        load_config(_config(tmp_path, _openai("http://127.0.0.1:1/v1", f'api_key_file = "{tmp_path}"\n')))


# ------------------------------------------------------------------------------------- 5. encodings in chat
def test_chat_writes_an_answer_stdout_cannot_encode_whole(server):
    """Under PYTHONIOENCODING=ascii the first non-ASCII character ended the answer with an error."""
    port, _ = server
    proc = _run(["chat", "--port", str(port), "--insecure", "hi"], env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode("ascii") == "h\\xe9llo \\u4e16\\u754c \\U0001f389 done\n"


C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": ""}


def test_a_utf8_prompt_on_stdin_under_a_c_locale_is_sent(server):
    """Python read stdin as ASCII there, and the UTF-8 prompt was refused as "not valid UTF-8"."""
    port, prompts = server
    proc = _run(["chat", "--port", str(port), "--insecure"], env={**os.environ, **C_LOCALE},
                input="h\u00e9llo \u4e16\u754c\n".encode())
    assert proc.returncode == 0, proc.stderr
    assert prompts[-1] == "h\u00e9llo \u4e16\u754c"


def test_a_utf8_prompt_argument_under_a_c_locale_is_sent(server):
    port, prompts = server
    proc = _run(["chat", "--port", str(port), "--insecure", "gr\u00fc\u00df"], env={**os.environ, **C_LOCALE})
    assert proc.returncode == 0, proc.stderr
    assert prompts[-1] == "gr\u00fc\u00df"


def test_a_prompt_on_stdin_that_is_not_utf8_is_refused_naming_the_byte(server, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"h\xffllo"), "utf-8", "surrogateescape"))
    assert main(["chat", "--port", str(server[0]), "--insecure"]) == 2
    assert capsys.readouterr().err == "tokenwire chat: error: the prompt on stdin is not valid UTF-8 text (byte 1)\n"


# --------------------------------------------------------------------------- 6. no empty folder after a refusal
def test_a_refused_run_leaves_no_folder_made_for_its_plot(tmp_path, monkeypatch, capsys):
    """check_outputs makes --plot/--log/--pcap folders before the handler checks its arguments: a run it then
    refused left them empty."""
    monkeypatch.chdir(tmp_path)
    argv = ["testbed", "compare", "--down-trace", "12mbps", "--tokens", "0"]
    assert main([*argv, "--plot", "ndX/deeper/x.png"]) == 2
    assert "--tokens" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_compare_argument_is_named_without_root_too(monkeypatch, capsys):
    """Root was checked first: a user without it was told "needs root" about a wrong --tokens (and the test above
    failed for them: `make test` is documented to pass root or not)."""
    from tokenwire.testbed import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert main(["testbed", "compare", "--down-trace", "12mbps", "--tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "--tokens" in err and "needs root" not in err
    assert main(["testbed", "compare", "--down-trace", "12mbps", "--tokens", "5"]) == 2  # (right: then root)
    assert "needs root" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- 7. --version
def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code in (0, None)
    version = installed_version()
    assert version != "unknown" and capsys.readouterr().out == f"tokenwire {version}\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_version_to_a_full_stdout_is_one_line():
    """--version prints while the arguments are parsed, before main's stream handling: it was a traceback."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([*CLI, "--version"], stdout=full, stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 2 and done.stderr == b"tokenwire: error: stdout: No space left on device\n"


# ------------------------------------------------------------------------------------------------- 8. -v
def test_verbose_help_says_it_is_not_the_daemons_level():
    text = " ".join(build_parser().format_help().split())
    assert "not the daemon, whose level is its configuration's [logging] level" in text


# -------------------------------------------------------------------------------------------- 9. messages
def test_a_nested_commands_error_names_the_whole_command(tmp_path, capsys):
    """`config check`'s errors read `tokenwire config: error:`; argparse's own say `tokenwire config check`."""
    assert main(["config", "check", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err.startswith("tokenwire config check: error: ")


def test_a_cafile_that_does_not_verify_the_server_is_named(server, tmp_path, capsys):
    """With --cafile given, the hint still said "trust the server's certificate with --cafile"."""
    other = tmp_path / "other.pem"
    other.write_bytes(make_self_signed(("127.0.0.1",)).cert_pem)
    assert main(["chat", "--port", str(server[0]), "--cafile", str(other), "hi"]) == 2
    err = capsys.readouterr().err
    assert f"the certificate in --cafile {other} does not verify this server's" in err, err
    assert "trust the server's certificate with --cafile" not in err


def test_insecure_with_a_cafile_is_refused(tmp_path, capsys):
    """--insecure silently ignored the CA file given with it."""
    assert main(["chat", "--insecure", "--cafile", str(tmp_path / "ca.pem"), "hi"]) == 2
    assert capsys.readouterr().err.startswith("tokenwire chat: error: --insecure skips the certificate check")


def test_cert_over_a_folder_names_the_file_not_its_temporary(tmp_path, capsys):
    (tmp_path / "cx" / "cert.pem").mkdir(parents=True)
    assert main(["cert", "--out-dir", str(tmp_path / "cx"), "--force"]) == 2
    err = capsys.readouterr().err
    assert err == f"tokenwire cert: error: {tmp_path / 'cx' / 'cert.pem'}: Is a directory\n", err
    assert not (tmp_path / "cx" / "key.pem").exists()  # the pair is written whole or not at all


@pytest.mark.parametrize("step", ["eval", "calibrate"])
def test_kv_text_that_cannot_be_read_is_said_once(tmp_path, capsys, step):
    """"cannot read /x: [Errno 2] No such file or directory: '/x'" named the file twice."""
    missing = tmp_path / "missing.txt"
    assert main(["kv", step, "--text", str(missing)]) == 2
    assert capsys.readouterr().err == f"tokenwire kv {step}: error: cannot read {missing}: No such file or directory\n"


def test_an_unknown_upstream_key_is_reported_before_the_type(tmp_path):
    """`typ = "demo"` said "type: expected one of ..., got None", without the "did you mean"."""
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.typ: unknown key \(did you mean 'type'\?\)"):
        load_config(_config(tmp_path, '[[upstreams]]\nname = "x"\ntyp = "demo"\n'))


@pytest.mark.parametrize("rate", ["-3", "-3mbps", "-0.5kbps"])
def test_demo_with_a_negative_rate_says_it_must_be_positive(capsys, rate):
    """It said "no such trace file"."""
    assert main(["demo", f"--rate-mbps={rate}"]) == 2
    assert capsys.readouterr().err == f"tokenwire demo: error: --rate-mbps: the rate must be positive, got {rate}\n"


# ------------------------------------------------------------------------------------------------ 10. help
def _help(*path: str) -> str:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]  # type: ignore[attr-defined]
    return " ".join(parser.format_help().split())


@pytest.mark.parametrize(("path", "shown"), [
    (("chat",), "--host HOST the server's address or name (default: 127.0.0.1)"),
    (("chat",), "--scheme {chatterbox,stream,duplicate} how the answer's tokens are sent (default: chatterbox)"),
    (("cert",), "--out-dir OUT_DIR where to write cert.pem and key.pem (default: .)"),
    (("testbed", "compare"), "--tokens N tokens per answer (default: 400)"),
    (("bench", "emulator"), "--seconds SECONDS length of each flood/probe phase (default: 3.0)"),
    (("kv", "bench"), "--repeats REPEATS timed runs (the median is reported) (default: 7)"),
    (("predictor", "train"), "--epochs EPOCHS most training epochs of each network; early stopping (--patience) may "
                             "end it sooner (default: 30)"),
])
def test_help_shows_defaults(path, shown):
    assert shown in _help(*path)


def test_help_shows_no_default_of_a_flag_or_an_unset_option():
    text = _help("chat")
    assert "(default: False)" not in text and "(default: None)" not in text and "(default: [])" not in text
    assert text.count("(default: 60") == 1  # --idle-timeout says "(default: 60)" itself: not twice


def test_the_sdk_server_on_a_busy_port_is_one_line():
    """`python -m tokenwire.transport.server --port P` with P taken was an OSError traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "tokenwire.transport.server", "--port", str(port)],
                              capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.decode() == (f"python -m tokenwire.transport.server: error: cannot listen on "
                                    f"udp/127.0.0.1:{port}: Address already in use\n")


@pytest.mark.parametrize(("key", "words"), [("listen", "kv.listen: expected 'host:port', got ''"),
                                            ("directory", "kv.directory: expected a folder, got ''")])
def test_an_empty_kv_string_is_refused_not_the_default(tmp_path, key, words):
    """`[kv] listen = ""` and `directory = ""` silently meant their defaults, while `metrics.listen = ""` is off."""
    with pytest.raises(ConfigError, match=words):
        load_config(_config(tmp_path, f'[kv]\n{key} = ""\n'))


def test_compare_writes_the_finished_runs_it_is_handed_when_it_stops(tmp_path, monkeypatch, capsys):
    """A failure or Ctrl-C after finished runs lost them all (no --json): the CLI writes what run_compare hands over
    (``on_partial``), marked "complete": false, and still fails."""
    from tokenwire.testbed import compare, netns

    doc = {"complete": False, "runs_finished": [{"scheme": "chatterbox", "seed": 0}],
           "runs_missing": [{"scheme": "stream", "seed": 0, "why": "interrupted"}],
           "stopped_at": {"scheme": "stream", "seed": 0}}

    def stopped(cfg, *, on_partial, **kwargs):
        on_partial(doc)
        raise KeyboardInterrupt

    monkeypatch.setattr(netns, "check_root", lambda: None)
    monkeypatch.setattr(compare, "run_compare", stopped)
    out = tmp_path / "c.json"
    assert main(["testbed", "compare", "--down-trace", "12mbps", "--tokens", "5", "--json", str(out)]) == 130
    assert json.loads(out.read_text()) == doc
    assert ('1 of 2 runs finished (stopped at stream seed 0); wrote them to ' f'{out} ("complete": false)'
            in capsys.readouterr().err)
