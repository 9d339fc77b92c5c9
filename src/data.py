"""The LightningDataModule: find or fetch the IDX files, flatten, scale, one-hot, batch.

It does what the Keras original does to its numpy arrays, once, on whole tensors:
images (N, 28, 28) uint8 -> (N, 784) float32 / 255, labels -> one-hot (N, 10) float32.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from src.config import DATASETS, UserError

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


class EpochShuffle:
    """This process's order of sample indices for one epoch, a function of (seed, epoch) alone.

    Like torch's DistributedSampler, Lightning calls `set_epoch` before each epoch, and a run
    resumed from a checkpoint sees exactly the orders an uninterrupted run would have.
    Under DDP each of `world_size` processes takes every world_size-th index; when training,
    the order is padded by wrapping so that all processes run the same number of steps.
    """

    def __init__(self, size: int, seed: int | None, rank: int = 0, world_size: int = 1, pad: bool = True):
        self.size, self.seed, self.rank, self.world_size, self.pad = size, seed, rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.pad:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def indices(self) -> torch.Tensor:
        if self.seed is None:
            order = torch.arange(self.size)
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        if self.pad and self.size % self.world_size:
            order = torch.cat([order, order[: self.world_size - self.size % self.world_size]])
        return order[self.rank :: self.world_size]


class TensorBatches:
    """Batches sliced from whole tensors, the way Keras's fit() serves numpy arrays.

    A DataLoader would call __getitem__ once per sample and collate 128 small tensors per
    step; slicing with one index tensor per batch costs one gather. The last partial batch
    is kept (469 steps of 128 for 60000 images). `batches_done` tells how many batches of
    the epoch were already trained on, so that a run resumed from a checkpoint written in
    the middle of an epoch goes on with the next unseen batch.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, sampler: EpochShuffle,
                 batches_done: Callable[[int], int] | None = None):
        self.x, self.y, self.batch_size, self.sampler = x, y, batch_size, sampler
        self.batch_sampler = None  # Lightning looks for a DataLoader's pair of samplers; set_epoch goes to `sampler`
        self.batches_done = batches_done

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        order = self.sampler.indices().to(self.x.device)
        start = self.batches_done(len(self)) if self.batches_done else 0
        for i in range(start, len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[index], self.y[index]


class MNISTDataModule(L.LightningDataModule):
    def __init__(self, name: str = "mnist", data_dir: str = "data", batch_size: int = 128, val_size: int = 0,
                 seed: int = 42):
        super().__init__()
        # Plain values, stored in checkpoints: predict finds the dataset a model was trained on.
        self.save_hyperparameters()
        self.train_xy = self.val_xy = self.test_xy = None

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node; the others wait at a barrier.
        prepare_files(self.hparams.name, self.hparams.data_dir)

    def setup(self, stage: str) -> None:
        if self.test_xy is not None:
            return
        raw = str(prepare_files(self.hparams.name, self.hparams.data_dir))
        x, y = load_split(self.hparams.name, raw, train=True)
        x_test, y_test = load_split(self.hparams.name, raw, train=False)
        val_size = self.hparams.val_size
        if val_size >= len(x):
            raise UserError(f"data.val_size={val_size} is not valid: expected less than the {len(x)} training images")
        if val_size:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.hparams.seed))
            self.val_xy = (x[order[:val_size]], y[order[:val_size]])
            x, y = x[order[val_size:]], y[order[val_size:]]
        self.train_xy, self.test_xy = (x, y), (x_test, y_test)
        rank_zero_info(f"train images {tuple(x.shape)} {str(x.dtype)[6:]}, train labels {tuple(y.shape)}"
                       + (f", validation images {tuple(self.val_xy[0].shape)}" if val_size else "")
                       + f", test images {tuple(x_test.shape)}, test labels {tuple(y_test.shape)}")
        # On a GPU the whole dataset (about 200 MB) lives on the device, so no step copies from the host.
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if device.type != "cpu":
            move = lambda xy: None if xy is None else (xy[0].to(device), xy[1].to(device))  # noqa: E731
            self.train_xy, self.val_xy, self.test_xy = move(self.train_xy), move(self.val_xy), move(self.test_xy)

    def _batches(self, xy, shuffle: bool) -> TensorBatches:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = EpochShuffle(len(xy[0]), self.hparams.seed if shuffle else None, rank, world, pad=shuffle)
        return TensorBatches(*xy, batch_size=self.hparams.batch_size, sampler=sampler,
                             batches_done=self._batches_done_this_epoch if shuffle else None)

    def _batches_done_this_epoch(self, steps_per_epoch: int) -> int:
        """Optimizer steps already taken in the current epoch: 0 unless resuming mid-epoch (one step per batch)."""
        if self.trainer is None:
            return 0
        done = self.trainer.global_step - self.trainer.current_epoch * steps_per_epoch
        return done if 0 < done < steps_per_epoch else 0

    def train_dataloader(self) -> TensorBatches:
        return self._batches(self.train_xy, shuffle=True)

    def val_dataloader(self):
        return [] if self.val_xy is None else self._batches(self.val_xy, shuffle=False)

    def test_dataloader(self) -> TensorBatches:
        return self._batches(self.test_xy, shuffle=False)
