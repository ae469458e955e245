"""Owner-only files by construction: the `server` and `client` commands set the process umask to 077 first.

Why the umask and not a chmod per file: what these commands create is written by many hands — our own code, Flower's
SuperLink (superlink.db), SuperNode and SuperExec, nginx (the front's logs), sqlite journals, tempfile, torch — and
every process they start inherits the umask across fork/exec. One `os.umask(0o077)` at the entry point makes all of
it 0600 (files) / 0700 (folders) whatever the login shell's umask (often 022: world-readable). The systemd units set
`UMask=0077` as well; this makes the foreground commands the README shows equally safe.

Exceptions are explicit chmods, each documented where it is made (server/front.py: when `server` runs as root the
state folder and its `front/` folder are 0711, traversal only, so that nginx's workers (www-data) reach their temp
folders; nothing there is listable or readable by them).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

OWNER_ONLY = 0o077


def current() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status; elsewhere a set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(OWNER_ONLY)
    os.umask(old)
    return old


def owner_only() -> int:
    """Set the umask to 077 for this process and everything it starts; check it took. Returns the previous one."""
    previous = os.umask(OWNER_ONLY)
    if current() != OWNER_ONLY:  # pragma: no cover - a platform that ignores umask
        raise RuntimeError(f"could not set the process umask to {OWNER_ONLY:03o}")
    return previous


def default_file_mode() -> int:
    """The mode a plain open() would give a new file now (0666 less the umask): 0600 under `owner_only()`."""
    return 0o666 & ~current()


def exposed(roots: Iterable[Path], allow: Iterable[Path] = ()) -> list[tuple[Path, str]]:
    """Everything below `roots` (roots included) that the group or others can read, write or (files) execute, as
    (path, mode in octal); folders in `allow` may be traversal-only (0711). Symlinks are not followed."""
    allowed = {Path(p).resolve() for p in allow}
    out: list[tuple[Path, str]] = []

    def check(p: Path) -> None:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            return
        bits = st.st_mode & 0o077
        if stat.S_ISDIR(st.st_mode) and p.resolve() in allowed:
            bits &= ~0o011  # search (traversal) allowed, nothing else
        if bits:
            out.append((p, oct(stat.S_IMODE(st.st_mode))))

    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        check(root)
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                check(Path(folder) / name)
    return out


def tighten(roots: Iterable[Path], allow: Iterable[Path] = ()) -> list[Path]:
    """Remove group/other bits from what `exposed` finds (left by a start under a looser umask); returns the paths."""
    fixed = []
    for path, _ in exposed(roots, allow):
        mode = stat.S_IMODE(path.lstat().st_mode)
        keep = 0o011 if path.is_dir() and path.resolve() in {Path(p).resolve() for p in allow} else 0
        os.chmod(path, mode & ~0o077 | (mode & keep))
        fixed.append(path)
    return fixed
