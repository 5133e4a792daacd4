"""Errors about the user's input: the CLI prints the one-line message and exits with code 2."""


class InputError(ValueError):
    """Bad user input (config, dataset row, path, parallel layout). The message is one line saying what and where."""
