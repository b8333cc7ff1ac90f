class VivaceError(ValueError):
    """A user-facing error: bad input, a bad pack or an unusable output path. One line, no traceback."""


class PackError(VivaceError):
    """The pack on disk does not match its schema: version, tensor names, shapes or config values."""


class EngineBusy(VivaceError):
    """The engine's running requests and waiting queue are full: try again later (HTTP 503 with Retry-After)."""
