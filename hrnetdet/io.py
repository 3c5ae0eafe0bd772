"""hrnetdet's home folder, and file writes that lose nothing and trust nothing: whole files replaced atomically, appends and
new files opened without following a link someone planted, private folders for caches.

Every module that writes a file the user keeps goes through here, so one place decides what a
half-written file, a full disk or a symlink in a shared folder can do."""
import os
import stat
from typing import IO, Callable


HOME_ENV = "HRNETDET_HOME"


def hrnetdet_home() -> str:
    """The one folder for what hrnetdet keeps between runs (converted weights, exported graphs,
    downloads): ``$HRNETDET_HOME``, else ``~/.cache/hrnetdet``."""
    return os.path.expanduser(os.environ.get(HOME_ENV) or os.path.join("~", ".cache", "hrnetdet"))


def _umask() -> int:
    """The process's umask (read without changing it where /proc says it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """``write(tmp)`` a new file beside ``path``, then rename it over ``path``: readers see the old
    file or the new one, never a part, and a link planted at ``path`` is replaced, not written
    through. The temporary file is created exclusively (never through an existing file or link). The file
    gets the user's umask (0644 by default), whatever mode the writer created it with."""
    tmp = f"{path}.tmp{os.getpid()}"  # the pid lets a later run remove what a killed one left
    if os.path.lexists(tmp):
        os.remove(tmp)  # left by an earlier process with our pid, or planted: removed, never followed
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    """``text`` into ``path`` through ``atomic_write``."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def open_no_follow(path: str, mode: str = "a") -> IO:
    """``open(path, mode)`` for appending, writing (or reading, ``"rb"``) that refuses a symlink at
    ``path`` (and any file that is not a regular file, without blocking on a FIFO) instead of going
    through it. Raises OSError naming the path."""
    flags = {"rb": os.O_RDONLY,
             "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
             "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC}[mode]
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError as e:
        if os.path.islink(path):
            raise OSError(e.errno, f"{path} is a symbolic link: refusing to open it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file: refusing to open it")
    return os.fdopen(fd, mode)


def private_dir(path: str) -> str:
    """``path`` as a folder only this user can enter (created 0700 when missing). Refused when it is
    a link, another user's, or open to others: a cache there could be planted or read."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a folder (a link?): refusing to use it as a private cache")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise OSError(f"{path} belongs to another user: refusing to use it as a private cache")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path
