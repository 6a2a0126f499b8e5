"""What an install probe found (sessions 34-35): a wheel lacked the systemd unit, its sysusers/tmpfiles snippets and
the example configuration the README installs, and `testbed kv`'s default context text; numba's cache of the
codec's kernels went into site-packages (files `pip uninstall` left behind), or, for a user with no writable home
and a read-only install, nowhere at all ("no locator available": the codec could not be imported)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {  # in the wheel -> in the source tree
    "tokenwire/systemd/tokenwire.service": "systemd/tokenwire.service",
    "tokenwire/systemd/tokenwire.sysusers": "systemd/tokenwire.sysusers",
    "tokenwire/systemd/tokenwire.tmpfiles": "systemd/tokenwire.tmpfiles",
    "tokenwire/systemd/tokenwire.toml.example": "systemd/tokenwire.toml.example",
    "tokenwire/testbed/data/prose_harbor.txt": "netns-testbed/data/prose_harbor.txt",
}


def test_the_wheel_carries_the_unit_the_example_and_the_default_text(tmp_path) -> None:
    """Built from a copy of what the build reads (~2 s, no build isolation: the checkout's build/ is left alone),
    the wheel's RECORD lists each file with the source tree's bytes."""
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("daemon", "transport", "predictor", "netns-testbed", "systemd"):
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    code = "import sys\nfrom setuptools import build_meta\nprint(build_meta.build_wheel(sys.argv[1]))\n"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "dist" / done.stdout.split()[-1]) as wheel:
        record = wheel.read("tokenwire-0.1.0.dist-info/RECORD").decode()
        listed = {line.split(",")[0] for line in record.splitlines()}
        assert set(SHIPPED) <= listed, sorted(set(SHIPPED) - listed)
        for inside, outside in SHIPPED.items():
            assert wheel.read(inside) == (ROOT / outside).read_bytes(), inside


@pytest.mark.parametrize(("which", "name"), [("config", "tokenwire.toml.example"), ("unit", "tokenwire.service"),
                                             ("sysusers", "tokenwire.sysusers"), ("tmpfiles", "tokenwire.tmpfiles")])
def test_config_example_prints_the_shipped_files(which, name, capsys) -> None:
    """An installed copy has no systemd/ to `install` from: the command prints each file, and --dir the folder
    (systemd/ here, tokenwire/systemd/ beside tokenwire/daemon/ installed, as the wheel test shows)."""
    from tokenwire.daemon.cli import main

    assert main(["config", "example", which]) == 0
    assert capsys.readouterr().out == (ROOT / "systemd" / name).read_text(encoding="utf-8")
    assert main(["config", "example", "--dir"]) == 0
    assert Path(capsys.readouterr().out.strip()) == ROOT / "systemd"


def test_config_example_defaults_to_the_configuration(capsys) -> None:
    from tokenwire.daemon.cli import main

    assert main(["config", "example"]) == 0
    assert capsys.readouterr().out == (ROOT / "systemd" / "tokenwire.toml.example").read_text(encoding="utf-8")


def test_testbed_kvs_default_text_lies_in_the_package() -> None:
    """It was tests/data/prose_harbor.txt, which no install has; tests/data keeps a link to the shipped copy, so
    the earlier runs' contexts (keyed by name and content) are the same."""
    from tokenwire.testbed import kv_eval

    assert kv_eval.DEFAULT_TEXT.parent.parent == Path(kv_eval.__file__).resolve().parent
    assert kv_eval.DEFAULT_TEXT.is_file() and kv_eval.DEFAULT_TEXT.name == "prose_harbor.txt"
    linked = ROOT / "tests" / "data" / "prose_harbor.txt"
    assert linked.resolve() == kv_eval.DEFAULT_TEXT.resolve()
    assert kv_eval.DEFAULT_TEXT.read_text(encoding="utf-8").startswith("The Harbor Town in Winter")


def test_the_numba_cache_folder_follows_the_users_choice_then_xdg_then_home_then_tmp() -> None:
    from tokenwire.transport.cachegen.numba_cache import candidates

    tmp = "/tmp"
    assert candidates({"NUMBA_CACHE_DIR": "/srv/numba"}, "/home/u", tmp, 7) == []
    assert candidates({"XDG_CACHE_HOME": "/x"}, "/home/u", tmp, 7) == [("/x/tokenwire/numba", False),
                                                                      ("/tmp/tokenwire-numba-7", True)]
    # a relative XDG_CACHE_HOME is ignored (the XDG specification); an empty NUMBA_CACHE_DIR is numba's "unset"
    assert candidates({"XDG_CACHE_HOME": "rel", "NUMBA_CACHE_DIR": ""}, "/home/u", tmp, 7)[0] == (
        "/home/u/.cache/tokenwire/numba", False)
    assert candidates({}, "~", tmp, 7) == [("/tmp/tokenwire-numba-7", True)]  # no home at all


def test_a_shared_fallback_folder_must_be_private(tmp_path) -> None:
    """Under /tmp anyone may make the folder first, and numba loads its cache files (pickles)."""
    from tokenwire.transport.cachegen.numba_cache import _private

    uid = os.geteuid()
    assert _private(str(tmp_path / "fresh"), uid)
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o700
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    assert not _private(str(open_folder), uid)
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert not _private(str(tmp_path / "link"), uid)
    assert not _private(str(tmp_path / "fresh"), uid + 1)  # someone else's


_PROBE = """\
import os, sys
import tokenwire.transport.cachegen.rans, tokenwire.transport.cachegen.tables
from numba.core import config
print(os.environ.get("NUMBA_CACHE_DIR", ""), config.CACHE_DIR, sep="|")
"""


def _probe(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_the_codec_sets_numbas_cache_before_numba_reads_it(tmp_path) -> None:
    """In a fresh process: importing the kernels' modules points numba at the per-user folder (not at the
    installed modules' __pycache__), and leaves a NUMBA_CACHE_DIR the user set alone."""
    pytest.importorskip("numba")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    want = str(tmp_path / "xdg" / "tokenwire" / "numba")
    assert _probe(env) == f"{want}|{want}"
    assert (tmp_path / "xdg" / "tokenwire" / "numba").is_dir()
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")
    assert _probe(env) == f"{tmp_path / 'mine'}|{tmp_path / 'mine'}"
