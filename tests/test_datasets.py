"""gatekit.datasets: the .npz and torchvision paths, where data is looked for, splits and errors.

Every dataset here is a small fake written to a temporary folder; no test reads or downloads real data.
Image ``i`` of a fake split has pixel (0, 0) == i, so a loaded image tells which one it was.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from gatekit import GatekitError
from gatekit.datasets import DATASETS, ENV_VAR, VAL_FRACTION, jpeg, load_dataset

TRAIN, TEST = 200, 30


def fake_arrays(count: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
    images[(slice(None),) + (0,) * len(shape)] = np.arange(count)
    return images, rng.integers(0, 10, size=count).astype(np.uint8)


def fake_data(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    (x_train, y_train), (x_test, y_test) = fake_arrays(TRAIN, shape, 0), fake_arrays(TEST, shape, 1)
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def write_npz(folder, file_name: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / file_name, **arrays)
    return arrays


def image_ids(dataset, name: str) -> list[int]:
    """Recover pixel (0, 0) of every image, i.e. its index in the fake split."""
    spec = DATASETS[name]
    first_pixel = dataset.tensors[0][:, 0, 0, 0] * spec.std[0] + spec.mean[0]
    return (first_pixel * 255).round().long().tolist()


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def fashion(tmp_path, no_env):
    return tmp_path, write_npz(tmp_path, "fashion_mnist.npz", fake_data((28, 28)))


def test_npz_grayscale_is_normalized_nchw(fashion):
    root, arrays = fashion
    images, labels = load_dataset("fashion-mnist", split="test", root=root).tensors
    assert images.shape == (TEST, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == arrays["y_test"].tolist()
    expected = (torch.from_numpy(arrays["x_test"]).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(images[:, 0], expected)


def test_npz_channels_last_becomes_channels_first(tmp_path, no_env):
    arrays = write_npz(tmp_path, "cifar10.npz", fake_data((32, 32, 3)))
    images, _ = load_dataset("cifar10", split="test", root=tmp_path).tensors
    assert images.shape == (TEST, 3, 32, 32)
    # Blue channel of image 4 at row 5, column 6: 0.4465 / 0.2616 are CIFAR-10's blue mean and std.
    assert images[4, 2, 5, 6].item() == pytest.approx((arrays["x_test"][4, 5, 6, 2] / 255 - 0.4465) / 0.2616, abs=1e-5)


def test_val_is_a_fixed_tenth_of_train_disjoint_from_train(fashion):
    root, _ = fashion
    val = image_ids(load_dataset("fashion-mnist", split="val", root=root), "fashion-mnist")
    train = image_ids(load_dataset("fashion-mnist", split="train", root=root), "fashion-mnist")
    assert len(val) == int(TRAIN * VAL_FRACTION) and len(train) == TRAIN - len(val)
    assert sorted(val + train) == list(range(TRAIN))
    assert image_ids(load_dataset("fashion-mnist", split="val", root=root), "fashion-mnist") == val
    assert val != list(range(len(val)))  # a seeded random tenth, not the first one


def test_limit_spreads_over_a_class_sorted_split(tmp_path, no_env):
    x_test, _ = fake_arrays(100, (32, 32, 3), 2)
    write_npz(tmp_path, "cifar10_test_jpeg.npz", dict(x_test=x_test, y_test=np.repeat(np.arange(10), 10).astype(np.uint8)))
    labels = load_dataset("cifar10-jpeg", split="test", root=tmp_path, limit=20).tensors[1]
    assert sorted(labels.tolist()) == sorted(list(range(10)) * 2)


def test_env_var_is_used_without_root(tmp_path, monkeypatch):
    write_npz(tmp_path, "mnist.npz", fake_data((28, 28)))
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert len(load_dataset("mnist", split="test")) == TEST


def test_root_wins_over_env_var(tmp_path, monkeypatch):
    write_npz(tmp_path / "a", "mnist.npz", fake_data((28, 28)))
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "empty"))
    assert len(load_dataset("mnist", split="test", root=tmp_path / "a")) == TEST


def test_default_is_shared_data_next_to_the_working_directory(tmp_path, monkeypatch, no_env):
    write_npz(tmp_path / "shared" / "data", "mnist.npz", fake_data((28, 28)))
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    assert len(load_dataset("mnist", split="test")) == TEST  # the fake, not the real 10000 images


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path, no_env):
    with pytest.raises(GatekitError, match="GATEKIT_DATA") as error:
        load_dataset("fashion-mnist", root=tmp_path)
    assert str(tmp_path) in str(error.value) and "download=True" in str(error.value)


def test_npz_only_dataset_missing(tmp_path, no_env):
    with pytest.raises(GatekitError, match="exists only as that file"):
        load_dataset("cifar10-jpeg", split="test", root=tmp_path)


@pytest.mark.parametrize(
    "name, split, limit, match",
    [("svhn", "train", None, "unknown dataset"), ("mnist", "valid", None, "no split"),
     ("cifar10-jpeg", "train", None, "no split"), ("mnist", "train", 0, "limit")],
)
def test_bad_arguments(name, split, limit, match, tmp_path):
    with pytest.raises(GatekitError, match=match):
        load_dataset(name, split=split, root=tmp_path, limit=limit)


def test_corrupt_npz(tmp_path, no_env):
    (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 not really a zip archive")
    with pytest.raises(GatekitError, match="not a readable .npz"):
        load_dataset("mnist", root=tmp_path)


def test_npz_with_wrong_keys(tmp_path, no_env):
    write_npz(tmp_path, "mnist.npz", dict(images=np.zeros((2, 28, 28), np.uint8)))
    with pytest.raises(GatekitError, match="x_train"):
        load_dataset("mnist", root=tmp_path)


def test_npz_with_wrong_shape(tmp_path, no_env):
    write_npz(tmp_path, "mnist.npz", fake_data((28, 28, 3)))
    with pytest.raises(GatekitError, match="uint8 images of shape N x H x W"):
        load_dataset("mnist", root=tmp_path)


# torchvision's own on-disk formats. MNIST and FashionMNIST only check that the raw IDX files exist
# (no MD5 without download=True), so a small fake goes through torchvision unchanged.


def write_idx(path, array: np.ndarray) -> None:
    """IDX: zero, zero, type 0x08 (uint8), number of dimensions, big-endian sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_idx_files(name, folder, tmp_path, no_env):
    arrays, raw = fake_data((28, 28)), tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, part in (("train", "train"), ("t10k", "test")):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", arrays[f"x_{part}"])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", arrays[f"y_{part}"])
    write_npz(tmp_path / "npz", DATASETS[name].npz_file, arrays)
    for split in ("train", "val", "test"):
        through_torchvision = load_dataset(name, split=split, root=tmp_path).tensors
        through_npz = load_dataset(name, split=split, root=tmp_path / "npz").tensors
        for got, expected in zip(through_torchvision, through_npz):
            torch.testing.assert_close(got, expected)


# CIFAR10 checks the MD5 of every pickle even with download=False, so no fake can pass; the test
# replaces only that check, and torchvision still reads the pickles and turns them channels-last.


def test_torchvision_cifar10_pickles(tmp_path, no_env, monkeypatch):
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    arrays, folder = fake_data((32, 32, 3)), tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train_parts = np.array_split(np.arange(TRAIN), 5)
    batches = {f"data_batch_{i + 1}": part for i, part in enumerate(train_parts)}
    for file_name, indices in [*batches.items(), ("test_batch", None)]:
        images, labels = (arrays["x_train"][indices], arrays["y_train"][indices]) if indices is not None else (arrays["x_test"], arrays["y_test"])
        entry = {"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), "labels": labels.tolist()}
        (folder / file_name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    write_npz(tmp_path / "npz", "cifar10.npz", arrays)
    for split in ("train", "test"):
        for got, expected in zip(load_dataset("cifar10", split=split, root=tmp_path).tensors,
                                 load_dataset("cifar10", split=split, root=tmp_path / "npz").tensors):
            torch.testing.assert_close(got, expected)


def test_download_flag_reaches_torchvision(tmp_path, no_env, monkeypatch):
    import torchvision

    calls = []

    def offline_download(self):
        calls.append(self.root)
        raise RuntimeError("Error downloading t10k-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline_download)
    with pytest.raises(GatekitError, match="Error downloading"):
        load_dataset("fashion-mnist", split="test", root=tmp_path, download=True)
    assert calls == [str(tmp_path)]


def test_pixels_transform_runs_on_the_split_before_normalization(fashion):
    root, arrays = fashion
    inverted = load_dataset("fashion-mnist", split="test", root=root, pixels=lambda images: 255 - images).tensors[0]
    expected = (torch.from_numpy(255 - arrays["x_test"]).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(inverted[:, 0], expected)


@pytest.mark.parametrize("shape", [(28, 28), (32, 32, 3)])
def test_jpeg_round_trip_keeps_shape_and_changes_pixels(shape):
    images = fake_arrays(4, shape, seed=2)[0]
    encoded = jpeg(75)(images)
    assert encoded.shape == images.shape and encoded.dtype == np.uint8
    assert not np.array_equal(encoded, images)  # random pixels do not survive a lossy encoder
    assert np.abs(encoded.astype(int) - images).mean() > np.abs(jpeg(100)(images).astype(int) - images).mean()


def test_pixels_transform_that_changes_shape_is_refused(fashion):
    root, _ = fashion
    with pytest.raises(GatekitError, match="return uint8 images of shape"):
        load_dataset("fashion-mnist", split="test", root=root, pixels=lambda images: images[:, :10])
    with pytest.raises(GatekitError, match="quality"):
        jpeg(0)
