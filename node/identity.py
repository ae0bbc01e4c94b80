"""Persistent Ed25519 identities, one per live process: the same key file gives the same peer id
across restarts, and no two live processes ever share one.

A process holds its key through an exclusive `fcntl.flock` on a sibling lock file (`KEY.lock`)
for as long as it runs (the kernel drops the lock when the process dies, however it dies).
  - Default (no `--identity`): the identity folder holds `identity.key`, `identity-1.key`, ...;
    a process takes the first key whose lock is free, creating the key if it is missing. So the
    first server on a machine always gets `identity.key`, the second `identity-1.key`, and a
    restarted server gets back a key with an id and a reputation (several servers restarted at
    once may swap ids among themselves, which costs nothing).
  - Explicit `--identity FILE`: that key or nothing; a FILE held by a live process is one error
    line, never a shared peer id.
Keys are created with O_EXCL and mode 0600 under the lock, so two processes starting at once end
with two distinct ids, both on disk. A key that group or others may read is refused (it is the
peer's whole identity: anyone who reads it can sign records as this server).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import load_identity
from libp2p.peer.id import ID
from llmswarm.node import config
from llmswarm.node.errors import NodeError


class IdentityInUse(NodeError):
    """An explicit identity key is held by another live process."""


@dataclass
class Identity:
    """A key pair and the lock that makes it this process's alone (released by `close`)."""

    key_pair: KeyPair
    path: Path
    _lock_fd: int | None = field(default=None, repr=False)

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.key_pair)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def __enter__(self) -> Identity:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_key_path(index: int, folder: Path | None = None) -> Path:
    """`identity.key` for slot 0, `identity-N.key` after it, in the default identity folder."""
    folder = folder if folder is not None else config.default_identity_path().parent
    base = config.IDENTITY_FILE_NAME
    if index == 0:
        return folder / base
    stem, dot, suffix = base.partition(".")
    return folder / f"{stem}-{index}{dot}{suffix}"


def lock_path_of(key_path: Path) -> Path:
    return key_path.with_name(key_path.name + ".lock")


def acquire_identity(identity_path: str | Path | None = None) -> Identity:
    """The key this process runs as, locked for the life of the returned Identity.

    `identity_path` None: the first free slot of the default folder (see the module docstring).
    Otherwise exactly that file: IdentityInUse when another live process holds it."""
    if identity_path is not None:
        path = Path(identity_path).expanduser()
        fd = _try_lock(path)
        if fd is None:
            holder = _lock_holder(path)
            raise IdentityInUse(
                f"identity {path} is in use by another live llmswarm process{holder}: give this one its own "
                "--identity FILE, or leave --identity out to get a free key from the default folder")
        return _load_or_create_locked(path, fd)
    folder = config.default_identity_path().parent
    for index in range(config.MAX_DEFAULT_IDENTITIES):
        path = default_key_path(index, folder)
        fd = _try_lock(path)
        if fd is not None:
            return _load_or_create_locked(path, fd)
    raise NodeError(f"all {config.MAX_DEFAULT_IDENTITIES} identity keys in {folder} are held by live processes: "
                    "stop one, or pass --identity FILE")


def load_or_create_identity(identity_path: str | Path | None = None) -> KeyPair:
    """The key pair `acquire_identity` would give, without holding it (for tools and tests)."""
    with acquire_identity(identity_path) as ident:
        return ident.key_pair


def peer_id_of(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


# -- internals ---------------------------------------------------------------------------------------
def _try_lock(key_path: Path) -> int | None:
    """Open and flock `KEY.lock` without waiting: the descriptor if we hold it, None if a live
    process does. NodeError when the folder cannot hold a lock file at all."""
    lock = lock_path_of(key_path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise NodeError(f"cannot create the identity lock {lock}: {e.strerror}; "
                        "pass --identity FILE in a folder you can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise NodeError(f"cannot lock {lock}: {e.strerror}") from None
    with contextlib.suppress(OSError):  # who holds it: for the error line another process may print
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _lock_holder(key_path: Path) -> str:
    try:
        pid = int(lock_path_of(key_path).read_text().strip())
    except (OSError, ValueError):
        return ""
    return f" (pid {pid})"


def _load_or_create_locked(path: Path, lock_fd: int) -> Identity:
    try:
        key_pair = _load_checked(path) if path.exists() else _create(path)
    except BaseException:
        os.close(lock_fd)
        raise
    return Identity(key_pair, path, lock_fd)


def _load_checked(path: Path) -> KeyPair:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as e:
        raise NodeError(f"cannot read identity key {path}: {e.strerror}") from None
    if mode & 0o077:
        raise NodeError(f"identity key {path} is readable by group or others (mode {mode:04o}), and whoever "
                        f"reads it can sign records as this peer: run `chmod 600 {path}` and start again")
    try:
        return load_identity(path)
    except (OSError, ValueError) as e:
        raise NodeError(f"cannot read identity key {path}: {e}; delete it to create a new identity") from None


def _create(path: Path) -> KeyPair:
    """A new key, mode 0600, that appears whole or not at all: written and fsynced under a
    temporary name (O_EXCL), then hard-linked into place, which fails rather than overwrite."""
    key_pair = create_new_key_pair()
    data = key_pair.private_key.serialize()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a process of ours with this pid that died mid-write
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:  # written meanwhile by a process that does not lock (an older llmswarm)
            return _load_checked(path)
    except OSError as e:
        raise NodeError(f"cannot write identity key {path}: {e.strerror}; pass --identity FILE elsewhere") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return key_pair
