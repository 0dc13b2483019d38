"""Files the gateway writes whole: a temp file beside the target, renamed over it."""

from __future__ import annotations

import contextlib
import grp
import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: str | bytes, mode: int, group: str | None = None) -> str:
    """Write ``data`` (text is UTF-8) to ``path`` by a temp file renamed over it, with
    ``mode``, fsynced before the rename.

    ``group`` (e.g. "mosquitto", which must read the ACL and password file after it
    drops root) is applied when that group exists and we may chown; returns what was
    done about it, for the summary line.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # Mode first, then content: the data is never readable by others, not even briefly.
        os.fchmod(fd, mode)
        note = "group unchanged"
        if group is not None:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                note = f"group unchanged (no group {group})"
            else:
                try:
                    os.fchown(fd, -1, gid)
                    note = f"group {group}"
                except PermissionError:
                    note = f"group unchanged (not allowed to chown to {group})"
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode("utf-8") if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return note
