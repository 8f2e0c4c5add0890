"""The one exception type the CLIs turn into a clear message and a non-zero exit."""


class UserError(Exception):
    """A problem with what the user asked for or gave us (bad input, missing files, unsupported option)."""
