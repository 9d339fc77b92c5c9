"""The four IDX files: find or fetch them, check them, and read them as Keras's program prepares them.

Images (N, 28, 28) uint8 become (N, 784) float32 / 255 and labels one-hot (N, 10) float32, once,
on whole tensors. Free of Lightning, so that `python -m src.predict` starts quickly.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from src.config import DATASETS
from src.errors import UserError

DATASET_CLASSES = {"mnist": MNIST, "fashion_mnist": FashionMNIST}
assert tuple(DATASET_CLASSES) == DATASETS
# Folders outside data_dir that may already hold the files (Debian's dataset-fashion-mnist).
SYSTEM_FOLDERS = {"fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")]}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
NUM_CLASSES = 10
IMAGE_SIZE = 28 * 28


class DataError(UserError):
    """Missing or damaged data files."""


def raw_folder(name: str, data_dir: str | Path) -> Path:
    """Where torchvision keeps the parsed-from files: DATA_DIR/<Class>/raw."""
    return Path(data_dir) / DATASET_CLASSES[name].__name__ / "raw"


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in IDX_FILES)


def _find_local_copy(name: str, data_dir: Path) -> Path | None:
    """A folder holding the four files, plain or gzip'd: data_dir itself, then the system's."""
    for folder in [data_dir, *SYSTEM_FOLDERS.get(name, [])]:
        if all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in IDX_FILES):
            return folder
    return None


def files_here(name: str, data_dir: str | Path) -> bool:
    """Whether the four files are on this machine (prepared, in data_dir, or the system's copy): no download needed."""
    data_dir = Path(data_dir)
    return _complete(raw_folder(name, data_dir)) or _find_local_copy(name, data_dir) is not None


def prepare_files(name: str, data_dir: str | Path) -> Path:
    """Make sure DATA_DIR/<Class>/raw holds the four IDX files; return that folder.

    Files come from a local copy when there is one, else from torchvision's download.
    Several processes may call this at once (launcher jobs, DDP ranks): a file lock lets
    one do the work, and files are built under temporary names and renamed into place,
    so no process ever reads half a file and a killed download leaves nothing behind.
    """
    data_dir = Path(data_dir)
    raw = raw_folder(name, data_dir)
    if _complete(raw):
        return raw
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the data folder {raw}: {error.strerror}; set data.data_dir to a writable folder") from None
    with FileLock(raw / ".lock"):
        if _complete(raw):
            return raw
        with tempfile.TemporaryDirectory(dir=raw, prefix=".partial-") as tmp:
            tmp = Path(tmp)
            source = _find_local_copy(name, data_dir)
            if source is not None:
                for f in IDX_FILES:
                    if not (raw / f).is_file():
                        _copy_or_gunzip(source, f, tmp / f)
            else:
                _download(name, data_dir, raw, tmp)
            for f in IDX_FILES:
                if (tmp / f).is_file():
                    os.replace(tmp / f, raw / f)
    return raw


def _copy_or_gunzip(source: Path, filename: str, target: Path) -> None:
    plain, packed = source / filename, source / f"{filename}.gz"
    try:
        if plain.is_file():
            shutil.copyfile(plain, target)
        else:
            with gzip.open(packed, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except (OSError, EOFError) as error:
        bad = plain if plain.is_file() else packed
        raise DataError(f"cannot read {bad}: {error}; replace it with an intact copy") from None


def _download(name: str, data_dir: Path, raw: Path, tmp: Path) -> None:
    dataset = DATASET_CLASSES[name]
    try:
        # torchvision's own download and checksum code, into the temporary folder.
        dataset(tmp, train=True, download=True)
    except Exception as error:  # noqa: BLE001 - any failure here means "no files"; say what to do
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise DataError(
            f"{name} data not found in {data_dir} and the download failed ({reason}); "
            f"put {', '.join(IDX_FILES)} (plain or .gz) into {data_dir} or into {raw}, "
            f"or point data.data_dir at a folder holding them"
        ) from None
    downloaded = tmp / dataset.__name__ / "raw"
    for f in IDX_FILES:
        os.replace(downloaded / f, tmp / f)


def validation_split(size: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices of the `size` training images that train, and of the `val_size` held out for validation.

    A seeded permutation: the data module splits with it, and src.evaluate rebuilds a checkpoint's
    validation split with it from the val_size and seed the checkpoint records.
    """
    if val_size >= size:
        raise UserError(f"data.val_size={val_size} is not valid: expected less than the {size} training images")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return order[val_size:], order[:val_size]


@functools.lru_cache(maxsize=4)
def load_split(name: str, raw: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 784) float32 in [0, 1] and one-hot labels (N, 10) float32.

    Cached, so that the jobs of a sweep in one process read and convert the files once.
    """
    prefix = "train" if train else "t10k"
    images_file, labels_file = Path(raw) / f"{prefix}-images-idx3-ubyte", Path(raw) / f"{prefix}-labels-idx1-ubyte"
    dataset = DATASET_CLASSES[name]
    try:
        data = dataset(Path(raw).parent.parent, train=train, download=False)
        images, labels = data.data, data.targets
    except Exception:  # noqa: BLE001 - find which file torchvision choked on, and name it
        for path, reader in ((images_file, read_image_file), (labels_file, read_label_file)):
            try:
                reader(str(path))
            except Exception as error:  # noqa: BLE001
                raise DataError(f"{path} is damaged ({error or type(error).__name__}); "
                                f"delete it to fetch it again, or replace it with an intact copy") from None
        raise
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_file} holds images of shape {tuple(images.shape[1:])}, expected (28, 28); replace it")
    if len(images) != len(labels):
        raise DataError(f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels; "
                        "delete both to fetch them again, or replace them with a matching pair")
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{labels_file} has label {int(labels.max())}, expected 0..{NUM_CLASSES - 1}; replace it")
    x = images.reshape(len(images), IMAGE_SIZE).to(torch.float32).div_(255)
    y = torch.nn.functional.one_hot(labels, NUM_CLASSES).to(torch.float32)
    return x, y
