"""Writes data/digits: a small image-folder demo set for `kiln finetune`, cut from the embedded
MNIST subset (data/mnist, see its PROVENANCE.md): the first 60 training and 20 test images of
each digit, as 28x28 grayscale PNGs in data/digits/{train,val}/<digit>/<index>.png.

Run from the repository root (not run by CI; the output is committed):
    python3 scripts/make_digits_folder.py
"""
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "simple_cnn"))
from generate import read_idx  # noqa: E402  (the IDX reader lives with the fixtures)

PER_CLASS = {"train": 60, "val": 20}
SOURCE = {"train": "train", "val": "t10k"}


def main():
    for split, count in PER_CLASS.items():
        images = read_idx(f"data/mnist/{SOURCE[split]}-images-idx3-ubyte.gz")
        labels = read_idx(f"data/mnist/{SOURCE[split]}-labels-idx1-ubyte.gz")
        for digit in range(10):
            out = f"data/digits/{split}/{digit}"
            os.makedirs(out, exist_ok=True)
            for index in np.flatnonzero(labels == digit)[:count]:
                Image.fromarray(images[index], mode="L").save(f"{out}/{index:05d}.png", optimize=True)


if __name__ == "__main__":
    main()
