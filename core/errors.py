"""Errors the CLI reports in one line: bad input (exit 2) and storage failures (exit 1)."""


class InputError(ValueError):
    """Bad user input (config, dataset row, path, parallel layout). The message is one line saying what and where."""


class StorageError(RuntimeError):
    """Writing a checkpoint or an export failed on the filesystem (no space, I/O error, no permission), or the
    disk is clearly too small for the run's checkpoints. One line naming the path and its free space; the
    partial write is removed and the previous checkpoint stays loadable. Not retried: it would fail again."""
