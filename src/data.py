"""The LightningDataModule: the IDX files as whole tensors (src/idx.py), a validation split,
and batches served the way Keras's fit() serves numpy arrays.
"""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from src.idx import load_split, prepare_files, validation_split


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
                 seed: int = 42, labels: str = "one_hot"):
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
        if self.hparams.labels == "integer":
            # The 2nd and 3rd editions' labels: the digits themselves, for sparse_categorical_crossentropy.
            y, y_test = y.argmax(dim=1), y_test.argmax(dim=1)
        val_size = self.hparams.val_size
        if val_size:
            train, val = validation_split(len(x), val_size, self.hparams.seed)
            self.val_xy = (x[val], y[val])
            x, y = x[train], y[train]
        self.train_xy, self.test_xy = (x, y), (x_test, y_test)
        rank_zero_info(f"train images {tuple(x.shape)} {str(x.dtype)[6:]}, train labels {tuple(y.shape)}"
                       + (f", validation images {tuple(self.val_xy[0].shape)}" if val_size else "")
                       + f", test images {tuple(x_test.shape)}, test labels {tuple(y_test.shape)}")
        # On a GPU the whole dataset (about 220 MB) lives on the device, so no step copies from the host.
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if device.type != "cpu":
            self.train_xy, self.val_xy, self.test_xy = (
                None if xy is None else tuple(t.to(device) for t in xy) for xy in (self.train_xy, self.val_xy, self.test_xy))

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
