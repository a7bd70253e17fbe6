"""npgpt's own exception: a message meant for the user, printed by the CLIs without a traceback."""
import errno


class NpgptError(Exception):
    """Something the user can fix: a bad file, flag, config or checkpoint."""


class CheckpointError(NpgptError, ValueError):
    """A checkpoint or weights file that is missing, corrupt, foreign or mismatched."""


class WriteError(NpgptError):
    """A file npgpt writes could not be written (a full disk, a read-only or missing
    folder, a size limit): the message names the file, the system's reason and what to do;
    the previous version of the file, if any, is intact."""

    def __init__(self, path, error, elsewhere="another --out-dir"):
        reason = error.strerror or str(error)
        hint = {errno.ENOSPC: "free some space on that disk, or write to " + elsewhere,
                errno.EDQUOT: "your disk quota is full: free some space, or write to "
                              + elsewhere,
                errno.EROFS: "that folder is on a read-only file system: write to " + elsewhere,
                errno.EACCES: "you may not write in that folder: write to " + elsewhere
                              + ", or change its permissions",
                errno.EFBIG: "the file is larger than this system allows (ulimit -f): raise "
                             "the limit, or write to " + elsewhere}.get(
            error.errno, f"check that the folder exists and can be written, or write to "
                         f"{elsewhere}")
        super().__init__(f"could not write {path}: {reason}; {hint}. Nothing was half-written: "
                         "an earlier version of the file, if any, is intact")
        self.path, self.errno = path, error.errno
