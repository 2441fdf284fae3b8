"""Errors a user can act on. The CLI prints them as one line, never as a traceback."""


class PsdclipError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class InputError(PsdclipError):
    """An input file (URL list, dataset, config) is missing, malformed or inconsistent."""
