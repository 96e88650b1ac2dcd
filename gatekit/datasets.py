"""Image-classification data for examples, tests and benchmarks: offline ``.npz`` files or torchvision.

Splits: ``"train"`` is the official training set minus a fixed 10% held out as ``"val"`` (a permutation
seeded with ``VAL_SEED``; ``.npz`` files and torchvision keep the official order, so both give the same
split), and ``"test"`` is the official test set. Tune on ``"val"``; report ``"test"`` once.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .errors import GatekitError

SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.1
VAL_SEED = 0
ENV_VAR = "GATEKIT_DATA"
DOWNLOAD_ROOT = Path.home() / ".cache" / "gatekit" / "data"
_REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset is found and how its pixels are normalized."""

    npz_file: str
    torchvision_class: str | None  # None: distributed as the .npz file only
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, ...] = SPLITS


_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DATASETS = {
    "mnist": DatasetSpec("mnist.npz", "MNIST", (0.1307,), (0.3081,)),
    "fashion-mnist": DatasetSpec("fashion_mnist.npz", "FashionMNIST", (0.2860,), (0.3530,)),
    "cifar10": DatasetSpec("cifar10.npz", "CIFAR10", _CIFAR_MEAN, _CIFAR_STD),
    "cifar10-jpeg": DatasetSpec("cifar10_test_jpeg.npz", None, _CIFAR_MEAN, _CIFAR_STD, ("test",)),
}


def load_dataset(
    name: str, *, split: str = "train", root: str | os.PathLike | None = None, download: bool = False,
    limit: int | None = None, pixels: Callable[[np.ndarray], np.ndarray] | None = None,
) -> TensorDataset:
    """Load a dataset as normalized float images (N, C, H, W) and int64 labels.

    The ``.npz`` file is searched in ``root``; without ``root`` in ``$GATEKIT_DATA``; without either in
    ``../shared/data`` relative to the working directory, then to the repository. If none holds it,
    torchvision loads (and with ``download=True`` downloads) it under the same folder, by default
    ``~/.cache/gatekit/data``. Note ``cifar10.npz`` holds official test images 0-999 only;
    ``"cifar10-jpeg"`` is all 10000, JPEG-compressed (split ``"test"`` only).

    Args:
        name: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` or ``"cifar10-jpeg"``.
        split: ``"train"``, ``"val"`` or ``"test"`` (see the module docstring).
        root: folder holding the ``.npz`` file or torchvision's files.
        download: let torchvision download the data if no copy is found.
        limit: keep this many examples, spread evenly over the split (a class-sorted split keeps
            every class).
        pixels: applied to the split's uint8 images, ``(N, H, W)`` or ``(N, H, W, C)``, before
            normalization; must return uint8 images of the same shape. For example ``jpeg(75)``, to
            calibrate exits on images that went through a deployment's JPEG encoder.

    Returns:
        A ``TensorDataset`` of ``(image, label)`` pairs.

    Raises:
        GatekitError: unknown name or split, data not found, or a corrupt file.

    >>> images, labels = load_dataset("fashion-mnist", split="val", limit=100).tensors  # doctest: +SKIP
    >>> images.shape, labels.dtype  # doctest: +SKIP
    (torch.Size([100, 1, 28, 28]), torch.int64)
    """
    spec = _spec(name, split, limit)
    images, labels = _load_arrays(name, spec, "test" if split == "test" else "train", root, download)
    indices = _split_indices(len(labels), split)
    if limit is not None and limit < len(indices):
        indices = indices[np.arange(limit) * len(indices) // limit]
    chosen = images[indices] if pixels is None else _transformed(images[indices], pixels)
    return TensorDataset(_normalize(chosen, spec), torch.from_numpy(labels[indices].astype(np.int64)))


def jpeg(quality: int) -> Callable[[np.ndarray], np.ndarray]:
    """A ``pixels`` transform for ``load_dataset``: every image saved as JPEG at ``quality`` (1-100) and
    decoded again, as torchvision's ``encode_jpeg`` does it."""
    if not 1 <= quality <= 100:
        raise GatekitError(f"jpeg(quality={quality}): pass a JPEG quality from 1 to 100.")

    def round_trip(images: np.ndarray) -> np.ndarray:
        from torchvision.io import decode_jpeg, encode_jpeg

        tensors = torch.from_numpy(np.ascontiguousarray(images))
        tensors = tensors.unsqueeze(-1) if tensors.dim() == 3 else tensors
        decoded = [decode_jpeg(encode_jpeg(image.permute(2, 0, 1).contiguous(), quality=quality)).permute(1, 2, 0)
                   for image in tensors]
        return torch.stack(decoded).reshape(images.shape).numpy()

    return round_trip


def _transformed(images: np.ndarray, pixels: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    result = pixels(images)
    if not isinstance(result, np.ndarray) or result.shape != images.shape or result.dtype != np.uint8:
        got = f"{type(result).__name__} {getattr(result, 'shape', '')} {getattr(result, 'dtype', '')}".strip()
        raise GatekitError(f"load_dataset(pixels=...) returned {got}; return uint8 images of shape "
                           f"{images.shape}, as it was given.")
    return result


def _spec(name: str, split: str, limit: int | None) -> DatasetSpec:
    if name not in DATASETS:
        raise GatekitError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}.")
    spec = DATASETS[name]
    if split not in spec.splits:
        raise GatekitError(f"dataset {name!r} has no split {split!r}; use one of {', '.join(spec.splits)}.")
    if limit is not None and limit < 1:
        raise GatekitError(f"limit={limit}: pass a positive number of examples, or None for all.")
    return spec


def _load_arrays(name: str, spec: DatasetSpec, part: str, root, download: bool) -> tuple[np.ndarray, np.ndarray]:
    folders, torchvision_root = _search_folders(root)
    for folder in folders:
        if (folder / spec.npz_file).is_file():
            return _read_npz(folder / spec.npz_file, part, spec)
    return _read_torchvision(name, spec, part, download, folders, torchvision_root)


def _search_folders(root) -> tuple[list[Path], Path]:
    """Folders to search for the .npz file, and the folder torchvision uses if none has it."""
    chosen = root if root is not None else os.environ.get(ENV_VAR)
    if chosen:
        return [Path(chosen)], Path(chosen)
    candidates = [Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"]
    return list(dict.fromkeys(path.resolve() for path in candidates)), DOWNLOAD_ROOT


def _read_npz(path: Path, part: str, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            images, labels = archive[f"x_{part}"], archive[f"y_{part}"]
    except KeyError as error:
        raise GatekitError(
            f"{path} has no arrays x_{part} and y_{part} ({error}); a gatekit .npz holds uint8 arrays "
            f"x_train, y_train, x_test, y_test. Replace the file, or remove it to fall back to torchvision."
        ) from error
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise GatekitError(
            f"{path} is not a readable .npz file ({type(error).__name__}: {error}). Copy it again, or "
            f"remove it to fall back to torchvision."
        ) from error
    return _check_arrays(images, labels, str(path), spec)


def _read_torchvision(name: str, spec: DatasetSpec, part: str, download: bool, looked_in: list[Path], root: Path):
    looked = ", ".join(str(folder) for folder in looked_in)
    if spec.torchvision_class is None:
        raise GatekitError(
            f"found no {spec.npz_file} in {looked}; {name!r} exists only as that file. Set {ENV_VAR} to "
            f"the folder that holds it, or pass root=."
        )
    import torchvision  # imported here: the .npz path does not need it

    try:
        dataset = getattr(torchvision.datasets, spec.torchvision_class)(str(root), train=part == "train", download=download)
    except (RuntimeError, OSError) as error:
        raise GatekitError(
            f"no {name} data: found no {spec.npz_file} in {looked}, and torchvision found no "
            f"{spec.torchvision_class} under {root} ({error}). Set {ENV_VAR} to the folder holding "
            f"{spec.npz_file}, pass root=, or pass download=True to let torchvision download it."
        ) from error
    source = f"torchvision {spec.torchvision_class} under {root}"
    return _check_arrays(np.asarray(dataset.data), np.asarray(dataset.targets), source, spec)


def _check_arrays(images: np.ndarray, labels: np.ndarray, source: str, spec: DatasetSpec):
    channels = 1 if images.ndim == 3 else images.shape[-1] if images.ndim == 4 else None
    if images.dtype != np.uint8 or channels != len(spec.mean) or labels.shape != images.shape[:1]:
        raise GatekitError(
            f"{source}: expected uint8 images of shape N x H x W{'' if len(spec.mean) == 1 else ' x 3'} "
            f"and N labels, got {images.dtype} images of shape {images.shape} and labels of shape "
            f"{labels.shape}. Replace the data with a correct copy."
        )
    if len(images) == 0:
        raise GatekitError(f"{source} holds no images for this split; replace the data with a complete copy.")
    return images, labels


def _split_indices(count: int, split: str) -> np.ndarray:
    if split == "test":
        return np.arange(count)
    is_val = np.zeros(count, dtype=bool)
    is_val[np.random.default_rng(VAL_SEED).permutation(count)[: int(count * VAL_FRACTION)]] = True
    return np.flatnonzero(is_val if split == "val" else ~is_val)


def _normalize(images: np.ndarray, spec: DatasetSpec) -> torch.Tensor:
    pixels = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255)
    pixels = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2).contiguous()
    mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in (spec.mean, spec.std))
    return pixels.sub_(mean).div_(std)
