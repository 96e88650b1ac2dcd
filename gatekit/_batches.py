"""Reading batches from what users pass as data: tensors, datasets, data loaders."""
from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import GatekitError


def as_batches(data: Any, batch_size: int) -> Iterable:
    """Batches of ``data``: a tensor or a dataset is cut into ``batch_size`` pieces; a DataLoader or
    another iterable of batches is used as it is."""
    if isinstance(data, Tensor):
        data = TensorDataset(data)
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=batch_size)
    return data


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """(inputs, labels or None) from a batch of inputs, of (inputs,) or of (inputs, labels)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2) and isinstance(batch[0], Tensor):
        return batch[0], batch[1] if len(batch) == 2 else None
    raise GatekitError(
        f"cannot read a batch of type {type(batch).__name__}: give inputs, (inputs, labels) pairs, "
        f"a Dataset of those, or a DataLoader."
    )
