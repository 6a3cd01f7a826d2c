"""The exceptions of memoe-compare."""


class CompareError(Exception):
    """A usage or setup problem; main() prints it and exits with status 2."""


class MethodUnavailable(Exception):
    """The method cannot run here (e.g. offline without its statistics); reported, not raised."""


class RollbackError(RuntimeError):
    """The model did not come back bit for bit after a chunk's rollback."""
