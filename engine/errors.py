"""The one exception type the CLI turns into a one-line message and exit code 2."""


class EngineError(Exception):
    """A problem with the user's input (file, key, value) that deserves a one-line message."""
