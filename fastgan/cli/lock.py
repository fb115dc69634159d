"""One `fastgan train` writes into a folder at a time: an advisory lock on the output folder.

    lock = FolderLock.take(outf, run_id)   # UsageError naming the run that holds the folder
    ...                                    # the run: every check and write into outf under the lock
    lock.release()
    FolderLock.check(outf)                 # --dry-run: the same refusal, without taking the lock

The lock is flock(2) on LOCK_FILE in the folder, held through the run's open file for its whole life, so the
kernel drops it however the process ends, SIGKILL included.  The file names the holder (PID, run id, host,
start time) for the refusal.  A run that ends removes it; a file found unlocked was left by a run that died,
and is taken over with a line that says so.  A run that finds the lock held tries again for RETRY_SECONDS
before it refuses: a --dry-run's check holds a shared lock for a moment and must not turn a real run away.
A forked child (the image cache's decode workers) closes its copy of the lock's file, so that the lock goes
with the run even when the run is killed and an orphaned child lives on.
"""
import fcntl
import json
import os
import socket
import sys
import time

from ..usage import UsageError

LOCK_FILE = ".fastgan-train.lock"
RETRY_SECONDS, RETRY_WAIT = 0.5, 0.05
_held = set()  # the file descriptors of the locks this process holds


def _close_in_child():
    for fd in _held:
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class FolderLock:
    """The lock on ``folder`` held by this process (see the module)."""

    def __init__(self, folder, fd, created):
        self.folder, self.path, self.fd, self.created = folder, os.path.join(folder, LOCK_FILE), fd, created
        self.pid = os.getpid()
        _held.add(fd)

    @classmethod
    def take(cls, folder, run_id):
        """Lock ``folder`` (made if missing) for run ``run_id``; UsageError when another process holds it.  A
        filesystem without flock gets a line saying that the folder is not locked, and None."""
        created = not os.path.isdir(folder)
        path = os.path.join(folder, LOCK_FILE)
        give_up = time.monotonic() + RETRY_SECONDS
        while True:
            try:
                os.makedirs(folder, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UsageError(f"cannot write into {folder} ({exc.strerror or exc}); pick a folder you can write "
                                 "to with --outf DIR") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                if time.monotonic() >= give_up:
                    raise UsageError(refusal(folder, holder)) from None
                time.sleep(RETRY_WAIT)
                continue
            except OSError as exc:
                os.close(fd)
                print(f"fastgan train: cannot lock {folder} ({exc.strerror or exc}): a second run into it would not "
                      "be noticed", file=sys.stderr, flush=True)
                return None
            if _same_file(fd, path):
                break
            os.close(fd)  # its holder removed it as we opened it: lock the file now at that path
        previous = _holder(fd)
        if previous:
            print(f"fastgan train: {folder}: taking over the lock of {_who(previous)}, which ended without "
                  "releasing it", file=sys.stderr, flush=True)
        record = dict(pid=os.getpid(), run_id=run_id, host=socket.gethostname(),
                      started=time.strftime("%Y-%m-%d %H:%M:%S"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return cls(folder, fd, created)

    @staticmethod
    def check(folder):
        """UsageError when a run holds ``folder``; takes nothing and writes nothing (a shared lock for a moment)."""
        try:
            fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDONLY)
        except OSError:  # no lock file, no folder: nobody holds it
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(refusal(folder, _holder(fd))) from None
        except OSError:  # a filesystem without flock: take() says so in a real run
            pass
        finally:
            os.close(fd)

    def release(self):
        """Remove the lock file, then unlock; the folder goes too when the lock made it and nothing else is in it."""
        if self.fd is None or os.getpid() != self.pid:  # a forked child holds no lock (see the module)
            return
        _held.discard(self.fd)
        try:
            os.remove(self.path)
            if self.created:
                os.rmdir(self.folder)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def refusal(folder, holder):
    """The one line that turns a second run away from ``folder``."""
    who = _who(holder) if holder else "another fastgan train"
    stop = f" (or stop it, saving first: kill -INT {holder['pid']})" if holder and "pid" in holder else ""
    return (f"{folder} is in use by {who}, which is writing into it; wait for it to end{stop}, or write into "
            "another folder with --outf DIR")


def _who(holder):
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"run {holder.get('run_id')} (PID {holder.get('pid')}{where}, started {holder.get('started')})"


def _holder(fd):
    """The record in an open lock file, or None when it holds none (being written, or not ours)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _same_file(fd, path):
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
