"""One training run per output folder: OUT_DIR/run.lock, held while the run lives.

The lock is the operating system's (flock on an open file), not the file's existence: a
run that ends in any way, kill -9 and power loss included, releases it with its last
open file, so a lock left behind by a dead run is simply taken over. The file itself
only tells the next run who holds it ("PID HOST"). A second train.py on the same folder
refuses at once, naming them. Trainers of one process on one folder (a notebook, the
tests) share that process's lock. (No locking where the platform has no flock: Windows.)
"""
import os
import socket

from .errors import NpgptError, WriteError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux or macOS
    fcntl = None

LOCK_FILE = "run.lock"
_HELD = {}  # real path of a lock file: [fd, holders] (this process's runs share its lock)


class RunLock:
    def __init__(self, folder):
        self.folder, self.path, self.held = folder, os.path.join(folder, LOCK_FILE), False

    def acquire(self):
        """Hold the folder's lock (nothing to do if held already; other holders in this
        same process share it). Creating the lock file is also the first write into the
        folder: a folder that cannot be written is reported here, before any step."""
        if self.held or fcntl is None:
            return
        try:
            os.makedirs(self.folder, exist_ok=True)
            key = os.path.realpath(self.path)
            if key in _HELD:
                _HELD[key][1] += 1
                self.held = True
                return
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise WriteError(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            who = (f"process {holder[0]} on {holder[1]}" if len(holder) == 2
                   else "another process")
            raise NpgptError(f"{self.folder} is in use by another training run ({who}): "
                             "wait for it to end or stop it, or use another --out-dir") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as e:
            os.close(fd)
            raise WriteError(self.path, e) from None
        _HELD[key] = [fd, 1]
        self.held = True

    def release(self):
        """Let another run have the folder once no run of this process holds it (the file
        stays: removing it could let two runs lock two different files of one name)."""
        if not self.held:
            return
        self.held = False
        key = os.path.realpath(self.path)
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            os.close(_HELD.pop(key)[0])  # closing the file releases its flock
