"""Models and data named on the command line."""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ..errors import GatekitError

DATASET_NAMES = ("cifar10", "cifar10-jpeg", "mnist", "fashion-mnist")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a checkpoint written by gatekit.save, or a model name "
                        "(`gatekit sites --list` shows them, e.g. cifar/resnet20)")
    parser.add_argument("--convert", action="store_true", help="convert a named model with fresh gates (default: dense)")
    parser.add_argument("--gates", default="channel+layer", choices=("channel+layer", "channel", "layer"),
                        help="gating mode with --convert (default: %(default)s)")


def load_model(arguments: argparse.Namespace) -> nn.Module:
    """A gated checkpoint if ``model`` is a file, else a model built by name (converted on request)."""
    import gatekit
    from gatekit.adapters import example_input, get_model

    if os.path.exists(arguments.model):
        if arguments.convert:
            raise GatekitError("--convert applies to model names; a checkpoint is already gated.")
        return gatekit.load(arguments.model)
    if arguments.model.endswith((".pt", ".pth", ".ckpt")):
        raise GatekitError(f"no checkpoint at {arguments.model}: check the path.")
    model = get_model(arguments.model).eval()
    if arguments.convert:
        model = gatekit.convert(model, gates=arguments.gates, example_input=example_input(arguments.model))
    return model


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=DATASET_NAMES,
                        help="a dataset read from its .npz file or through torchvision (see --data-root)")
    source.add_argument("--image-folder", metavar="DIR", help="a torchvision ImageFolder tree of images")
    source.add_argument("--random", metavar="C,H,W", help="random normal inputs of this shape, no labels")
    parser.add_argument("--data-root", metavar="DIR", help="folder with the .npz file or torchvision's "
                        "files (default: $GATEKIT_DATA, then ../shared/data)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="resize and crop for --image-folder (default: %(default)s)")


def load_data(arguments: argparse.Namespace, samples: int | None) -> Dataset:
    from gatekit.datasets import load_dataset

    if arguments.dataset:
        return load_dataset(arguments.dataset, split=arguments.split, root=arguments.data_root,
                            download=arguments.download, limit=samples)
    if arguments.image_folder:
        return _image_folder(arguments.image_folder, arguments.image_size)
    return TensorDataset(torch.randn(samples or 256, *_shape(arguments.random)))


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise GatekitError(f"--random {text!r}: give a per-sample shape C,H,W of positive integers, e.g. 3,32,32.")
    return shape


def _image_folder(path: str, size: int) -> Dataset:
    from torchvision import datasets, transforms

    if not os.path.isdir(path):
        raise GatekitError(f"--image-folder {path}: no such folder.")
    transform = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet statistics
    ])
    try:
        return datasets.ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise GatekitError(f"--image-folder {path}: {error} (expected one sub-folder of images per class).") from error
