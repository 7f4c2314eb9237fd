"""User-facing errors: the CLI prints these as one line, without a stack trace."""


class DiffxError(Exception):
    """A problem with the user's input (a config key, a file, a path), not a bug in diffx.

    The message must name the offending key or file and say what was expected.
    """
