"""Pack the training split of the offline datasets small enough to travel to a GPU machine, and unpack it.

The device tool carries at most 64 MiB a call, and ``cifar10.npz`` alone is 144 MB. Only the images a
training run reads (the ``train`` split of ``gatekit.datasets``) travel, compressed with xz and a
byte-delta filter (CIFAR-10: 67% of raw). Unpacking writes an ``.npz`` whose ``x_train`` holds them at
their official positions and zeros at the held-out ``val`` positions, and whose test arrays are empty,
so that ``load_dataset(split="train")`` returns exactly the images it returns from the full file,
while evaluating on that machine fails loudly instead of scoring zeros. Evaluation happens where the
full data is.

    python experiments/pack_data.py pack cifar10 --parts 2 --out .gpu    # here
    python experiments/pack_data.py unpack .gpu --out data                # there
"""
from __future__ import annotations

import argparse
import json
import lzma
from pathlib import Path

import numpy as np

from gatekit.datasets import DATASETS, _search_folders, _split_indices

_FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 3}, {"id": lzma.FILTER_LZMA2, "preset": 9}]


def pack(name: str, parts: int, out: Path) -> None:
    folder = next(f for f in _search_folders(None)[0] if (f / DATASETS[name].npz_file).is_file())
    with np.load(folder / DATASETS[name].npz_file) as archive:
        images, labels = archive["x_train"], archive["y_train"]
    train = _split_indices(len(labels), "train")
    for part, chunk in enumerate(np.array_split(train, parts)):
        target = out / f"part{part}"  # one folder per device call
        target.mkdir(parents=True, exist_ok=True)
        header = dict(dataset=name, shape=list(images.shape), part=part, parts=parts, train_images=len(train))
        (target / f"{name}.{part}.json").write_text(json.dumps(header))
        np.save(target / f"{name}.{part}.labels.npy", labels)
        np.save(target / f"{name}.{part}.indices.npy", chunk)
        (target / f"{name}.{part}.xz").write_bytes(
            lzma.compress(np.ascontiguousarray(images[chunk]).tobytes(), format=lzma.FORMAT_XZ, filters=_FILTERS)
        )


def unpack(source: Path, out: Path, allow_partial: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    headers = [json.loads(p.read_text()) for p in sorted(source.glob("part*/*.json"))]
    for name in sorted({h["dataset"] for h in headers}):
        mine = [h for h in headers if h["dataset"] == name]
        images, count = np.zeros(mine[0]["shape"], dtype=np.uint8), 0
        for header in mine:
            stem = source / f"part{header['part']}" / f"{name}.{header['part']}"
            chunk = np.load(f"{stem}.indices.npy")
            pixels = np.frombuffer(lzma.decompress(Path(f"{stem}.xz").read_bytes()), dtype=np.uint8)
            images[chunk] = pixels.reshape((len(chunk),) + images.shape[1:])
            count += len(chunk)
            labels = np.load(f"{stem}.labels.npy")
        if count != mine[0]["train_images"] and not allow_partial:
            raise SystemExit(f"{name}: found {len(mine)} of {mine[0]['parts']} parts ({count} of "
                             f"{mine[0]['train_images']} images); carry the missing parts, or pass --allow-partial.")
        empty = np.zeros((0,) + images.shape[1:], dtype=np.uint8)
        np.savez(out / DATASETS[name].npz_file, x_train=images, y_train=labels, x_test=empty,
                 y_test=np.zeros(0, dtype=labels.dtype))
        print(f"{name}: {count} training images of {len(labels)} unpacked")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("dataset", choices=sorted(DATASETS))
    p.add_argument("--parts", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    u = sub.add_parser("unpack")
    u.add_argument("source", type=Path)
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--allow-partial", action="store_true", help="missing parts stay zeros (smoke tests only)")
    args = parser.parse_args()
    pack(args.dataset, args.parts, args.out) if args.command == "pack" else unpack(args.source, args.out, args.allow_partial)
