"""Keeping a file's permissions when it is replaced by a rename (certificates, keys, command outputs)."""

from __future__ import annotations

import os
from pathlib import Path


def keep_mode(old: Path, new: Path | int, *, private: bool = False) -> None:
    """Give ``new`` the permissions (and, as root, the owner and group) of the file ``old`` it will replace;
    nothing when there is none. Without it a result made private (0600) came back world-readable after a
    rerun, and a renewed key lost the group the service reads it through. ``private``: never readable or
    writable by others, whatever ``old`` was (a key). ``new``: a path, or the descriptor of the file open for
    writing (safer: in a folder others may write, a name can be swapped for a link before it is changed)."""
    try:
        st = old.stat()
    except FileNotFoundError:
        return
    mode = st.st_mode & (0o7770 if private else 0o7777)
    if os.geteuid() == 0:
        os.chown(new, st.st_uid, st.st_gid)
    elif st.st_gid != os.stat(new).st_gid:
        try:  # a member of the old group may give it (chown to a group of one's own)
            os.chown(new, -1, st.st_gid)
        except PermissionError:
            if private:  # the group bits would now open a key to another group: owner only
                mode &= 0o7700
    os.chmod(new, mode)
