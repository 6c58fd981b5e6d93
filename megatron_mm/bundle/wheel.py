"""Rewrite a wheel with some of its files changed: unpack, change, regenerate RECORD, zip again.

Hand-written because pip and `wheel` have no "edit a member" command (`wheel unpack`/`pack`
would do, but `pack` keeps RECORD as it was only when told to and needs the `wheel` CLI); the
wheel format (PEP 427) asks only that RECORD lists every file with its sha256 and size.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import zipfile
from typing import Callable


def _record_line(root: str, name: str) -> str:
    with open(os.path.join(root, name), "rb") as f:
        data = f.read()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def check_record(path: str) -> list[str]:
    """Members of the wheel whose sha256 or size differs from its RECORD (empty: consistent)."""
    bad = []
    with zipfile.ZipFile(path) as z, tempfile.TemporaryDirectory() as tmp:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        z.extractall(tmp)
        for line in z.read(record).decode().splitlines():
            name, digest, _size = line.rsplit(",", 2)
            if digest and _record_line(tmp, name) != line:
                bad.append(name)
    return bad


def rewrite(path: str, out: str, change: Callable[[str, str], dict | None]) -> dict:
    """Write `path`'s wheel to `out` with `change(member, file)` applied to every member file
    (it edits the unpacked file in place and may return a report). Returns {member: report}
    for the members whose change reported something."""
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            z.extractall(tmp)
        record = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        for info in infos:
            if not info.is_dir() and info.filename != record:
                report = change(info.filename, os.path.join(tmp, info.filename))
                if report:
                    reports[info.filename] = report
        lines = [_record_line(tmp, i.filename) for i in infos if not i.is_dir() and i.filename != record]
        with open(os.path.join(tmp, record), "w") as f:
            f.write("\n".join(lines + [f"{record},,"]) + "\n")
        partial = out + ".partial"
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            for info in infos:  # the original order and permissions, RECORD last as it was
                if info.is_dir():
                    continue
                file = os.path.join(tmp, info.filename)
                mode = info.external_attr >> 16
                if mode:
                    os.chmod(file, mode & 0o7777)  # extractall does not keep the executable bits
                z.write(file, info.filename)
        os.replace(partial, out)
    return reports
