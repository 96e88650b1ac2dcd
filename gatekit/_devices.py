"""Device arguments, checked before any work: a device this machine lacks is named as such."""
from __future__ import annotations

from typing import Any

import torch

from .errors import GatekitError


def usable_device(device: Any, argument: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, or GatekitError if it is malformed or not on this machine.

    torch's own errors for these ("Found no NVIDIA driver", "Torch not compiled with CUDA") come
    late and from deep inside; a checkpoint loaded to a missing GPU would even read as corrupt.
    """
    try:
        parsed = torch.device(device)
        torch.empty(0, device=parsed)
    except Exception as error:  # RuntimeError, AssertionError (no CUDA build), TypeError (not a device)
        raise GatekitError(
            f"{argument}={device!r} cannot be used on this machine: {type(error).__name__}: {error}\n"
            f"Hint: pass {argument}='cpu', or a device that torch sees here."
        ) from error
    return parsed
