"""Command outputs are written through a temporary file nobody else could have made: ".NAME.<pid>.tmp" was opened
with truncation and links followed, so a link planted under that name in a shared folder had the command (often
root) truncate and write the file of the planter's choosing."""

from __future__ import annotations

import os

from tokenwire.daemon.cli import output_file, save_bytes


def test_a_link_planted_at_the_old_temporary_name_is_left_alone(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "shared" / "result.json"
    out.parent.mkdir()
    for pid in (os.getpid(), os.getpid() + 1):  # the name the old code would pick
        (out.parent / f".result.json.{pid}.tmp").symlink_to(victim)
    save_bytes(out, b"{}\n")
    assert out.read_text() == "{}\n"
    assert victim.read_text() == "precious"


def test_a_new_output_gets_the_umasks_mode_and_an_old_one_keeps_its_own(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.txt"
        save_bytes(fresh, b"x")
        assert fresh.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        private = tmp_path / "private.txt"
        private.write_text("old")
        private.chmod(0o600)
        save_bytes(private, b"new")
        assert private.read_text() == "new" and private.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "out.bin"
    try:
        with output_file(out) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("writer failed")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []
