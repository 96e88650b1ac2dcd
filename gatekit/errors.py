"""Errors (and the one warning) gatekit raises. Every message names the problem and says how to fix it."""


class GatekitError(Exception):
    """Base class of every error gatekit raises on purpose."""


class TraceError(GatekitError):
    """torch.fx could not trace the model."""


class NoResidualBlockError(GatekitError):
    """The model has no residual block that gatekit can gate."""


class AlreadyConvertedError(GatekitError):
    """The model already carries gatekit gates."""


class NotConvertedError(GatekitError):
    """A gated model was needed, but the model has no gatekit gates."""


class MissingDependencyError(GatekitError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


class UngatableBlockError(GatekitError):
    """``convert(..., strict=True)`` met a residual block it cannot gate; the message says why."""


class ExitsError(GatekitError):
    """A model cannot take exits as asked, or has none where exits were needed."""


class InternalError(GatekitError):
    """An unexpected failure inside gatekit (a bug, or a pattern it does not know); the message
    names the step, the block and the node, and a way around it."""


class SkippedBlocksWarning(UserWarning):
    """``convert`` left some residual blocks ungated; the message names each and says why."""
