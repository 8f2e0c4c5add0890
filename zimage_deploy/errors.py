"""The one exception type the CLIs turn into a clear message and a non-zero exit."""


class UserError(Exception):
    """A problem with what the user asked for or gave us (bad input, missing files, unsupported option)."""


class RequestError(UserError):
    """A generation request that cannot be served as asked (bad size, missing image, ...): the caller's fault."""


class InternalError(RuntimeError):
    """A failure inside the runtime (backend crash, out of memory, ...): not the request's fault."""
