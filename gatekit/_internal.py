"""Turning an unexpected exception inside gatekit into a GatekitError that says where it happened.

Errors gatekit raises on purpose pass through unchanged. Anything else is a gatekit bug or a model
pattern it does not know: the user gets the step, the block and the node, and a way around it,
instead of a traceback from deep inside an fx pass.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from .errors import GatekitError, InternalError


@contextmanager
def internal_errors(step: str, node: str, *, block: str | None = None) -> Iterator[None]:
    """Re-raise any exception but a GatekitError as an :class:`InternalError` about ``step``."""
    try:
        yield
    except GatekitError:
        raise
    except Exception as error:
        where = f"block '{block}', node '{node}'" if block else f"node '{node}'"
        workaround = f"`exclude=[{block!r}]` leaves that block ungated" if block else "convert a smaller part of the model"
        raise InternalError(
            f"gatekit failed {step} ({where}): {type(error).__name__}: {error}\n"
            f"Hint: this is a gatekit bug or a pattern it does not know; {workaround}, and please "
            f"report it with the model."
        ) from error
