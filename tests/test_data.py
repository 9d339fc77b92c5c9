"""The data module does what Keras's preprocessing does, and batches as Keras's fit() does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from src.errors import UserError
from src.data import MNISTDataModule
from src.idx import IDX_FILES, DataError, load_split, prepare_files, raw_folder
from tests.conftest import make_digits, write_dataset, write_idx


def ready_module(data_dir: Path, **kwargs) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(data_dir), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_shapes_dtypes_scaling_and_one_hot(tiny_data, capsys):
    dm = ready_module(tiny_data)
    x, y = dm.train_xy
    assert x.shape == (600, 784) and x.dtype == torch.float32
    assert y.shape == (600, 10) and y.dtype == torch.float32
    images, labels = make_digits(600, seed=1)  # what conftest wrote
    assert torch.equal(x, torch.from_numpy(images).reshape(600, 784).float() / 255)
    assert x.min() >= 0 and x.max() == 1
    assert torch.equal(y.sum(dim=1), torch.ones(600))
    assert torch.equal(y.argmax(dim=1), torch.from_numpy(labels).long())
    assert dm.test_xy[0].shape == (200, 784) and dm.val_xy is None
    assert dm.val_dataloader() == []  # no validation split: nothing is validated, least of all the test set


def test_startup_line_reports_shapes(tiny_data, caplog):
    with caplog.at_level("INFO"):
        ready_module(tiny_data)
    assert "train images (600, 784) float32, train labels (600, 10)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        ready_module(tiny_data, val_size=100)
    # The whole line, each split's own shapes: 500 left to train, 100 held out, the 200 test images.
    assert ("train images (500, 784) float32, train labels (500, 10), validation images (100, 784), "
            "test images (200, 784), test labels (200, 10)") in caplog.messages


def test_setup_for_the_test_after_fit_reads_and_reports_once(tiny_data, caplog):
    """Lightning calls setup("fit") for trainer.fit and setup("test") for trainer.test: the tensors of the first
    stay (on a GPU, moved there once) and the shapes are reported once, as Keras reports them once."""
    with caplog.at_level("INFO"):
        dm = ready_module(tiny_data, val_size=100)
        splits = dm.train_xy, dm.val_xy, dm.test_xy
        dm.setup("test")
    assert all(a is b for a, b in zip(splits, (dm.train_xy, dm.val_xy, dm.test_xy)))
    assert sum(m.startswith("train images ") for m in caplog.messages) == 1


def test_batches_keep_the_last_partial_one(tiny_data):
    dm = ready_module(tiny_data, batch_size=128)
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader()) == 5  # 600 = 4 * 128 + 88
    assert [len(x) for x, _ in batches] == [128, 128, 128, 128, 88]
    seen = torch.cat([x for x, _ in batches])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, dm.train_xy[0].tolist()))  # every image once


def test_full_size_epoch_has_469_steps():
    dm = MNISTDataModule(batch_size=128)
    dm.train_xy = (torch.zeros(60000, 784), torch.zeros(60000, 10))
    assert len(dm.train_dataloader()) == 469


def first_batch_labels(dm: MNISTDataModule, epoch: int) -> torch.Tensor:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return next(iter(loader))[1].argmax(dim=1)


def test_reshuffles_every_epoch_and_repeats_for_the_same_seed(tiny_data):
    a, b = ready_module(tiny_data, seed=7), ready_module(tiny_data, seed=7)
    assert not torch.equal(first_batch_labels(a, 0), first_batch_labels(a, 1))
    assert torch.equal(first_batch_labels(a, 1), first_batch_labels(b, 1))
    other = ready_module(tiny_data, seed=8)
    assert not torch.equal(first_batch_labels(a, 0), first_batch_labels(other, 0))


def test_eval_batches_are_in_file_order(tiny_data):
    dm = ready_module(tiny_data)
    assert torch.equal(torch.cat([x for x, _ in dm.test_dataloader()]), dm.test_xy[0])


def test_validation_split_is_seeded_and_disjoint(tiny_data):
    dm = ready_module(tiny_data, val_size=100, seed=3)
    (x, _), (xv, _) = dm.train_xy, dm.val_xy
    assert len(x) == 500 and len(xv) == 100
    train_rows = set(map(tuple, x.tolist()))
    assert not any(tuple(r) in train_rows for r in xv.tolist())
    assert torch.equal(ready_module(tiny_data, val_size=100, seed=3).val_xy[0], xv)
    assert not torch.equal(ready_module(tiny_data, val_size=100, seed=4).val_xy[0], xv)  # the seed chooses it


def test_validation_split_must_leave_training_data(tiny_data):
    with pytest.raises(UserError, match="data.val_size=600") as error:
        ready_module(tiny_data, val_size=600)
    assert str(error.value) == "data.val_size=600 is not valid: expected less than the 600 training images"


def test_ddp_shards_are_disjoint_and_equal_in_steps(tiny_data):
    from src.data import EpochShuffle

    shards = [EpochShuffle(601, seed=1, rank=r, world_size=2).indices() for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 301
    assert [len(EpochShuffle(601, seed=1, rank=r, world_size=2)) for r in (0, 1)] == [301, 301]  # the steps Lightning counts
    assert set(torch.cat(shards).tolist()) == set(range(601))


def test_local_copy_is_installed_in_torchvisions_layout(tiny_data):
    raw = prepare_files("mnist", tiny_data)
    assert raw == raw_folder("mnist", tiny_data) == tiny_data / "MNIST" / "raw"
    assert all((raw / f).is_file() for f in IDX_FILES)
    assert not [p for p in raw.iterdir() if p.name.startswith(".partial")]


def test_the_systems_copy_is_used_when_data_dir_has_none(tmp_path, monkeypatch):
    """Debian's dataset-fashion-mnist, here a tiny stand-in: an empty data_dir is filled from it, no download."""
    import src.idx

    assert src.idx.SYSTEM_FOLDERS["fashion_mnist"] == [Path("/usr/share/datasets/fashion-mnist")]
    monkeypatch.setitem(src.idx.SYSTEM_FOLDERS, "fashion_mnist", [write_dataset(tmp_path / "system", n_train=60)])
    raw = prepare_files("fashion_mnist", tmp_path / "empty")
    assert raw == tmp_path / "empty" / "FashionMNIST" / "raw"
    assert load_split.__wrapped__("fashion_mnist", str(raw), train=True)[0].shape == (60, 784)


def test_plain_files_work_too(tmp_path):
    folder = write_dataset(tmp_path / "plain", gz=False)
    x, y = load_split("mnist", str(prepare_files("mnist", folder)), train=False)
    assert x.shape == (200, 784)


def test_a_missing_file_in_a_prepared_folder_is_restored(tiny_data):
    raw = prepare_files("mnist", tiny_data)
    (raw / "t10k-labels-idx1-ubyte").unlink()  # a copy cut short by a crash, or a file deleted by hand
    assert prepare_files("mnist", tiny_data) == raw and (raw / "t10k-labels-idx1-ubyte").is_file()
    x, y = load_split.__wrapped__("mnist", str(raw), train=False)
    assert y.shape == (200, 10)


def test_the_files_are_copied_under_the_folders_lock(tiny_data, monkeypatch):
    """Processes preparing one folder at once (DDP ranks, launcher jobs) take turns: each copy runs while
    raw/.lock is held, so another process cannot take it meanwhile."""
    from filelock import FileLock, Timeout

    import src.idx

    copy, locked = src.idx._copy_or_gunzip, []

    def copy_while_checking(source, filename, target):
        other = FileLock(raw_folder("mnist", tiny_data) / ".lock", timeout=0)  # as another process would try
        try:
            other.acquire()
            other.release()
        except Timeout:
            locked.append(filename)
        copy(source, filename, target)

    monkeypatch.setattr(src.idx, "_copy_or_gunzip", copy_while_checking)
    prepare_files("mnist", tiny_data)
    assert locked == list(IDX_FILES)


def test_a_damaged_source_is_named_and_leaves_nothing_half_copied(tmp_path):
    folder = write_dataset(tmp_path / "data")
    source = folder / "t10k-labels-idx1-ubyte.gz"  # the last of the four to be copied
    source.write_bytes(source.read_bytes()[:-20])  # cut short, as by an interrupted download
    with pytest.raises(DataError) as error:
        prepare_files("mnist", folder)
    message = str(error.value)
    assert message.startswith(f"cannot read {source}: ") and message.endswith("; replace it with an intact copy")
    assert "\n" not in message
    raw = raw_folder("mnist", folder)
    assert sorted(p.name for p in raw.iterdir()) == [".lock"]  # no file, whole or half, counts as prepared


def test_a_data_dir_that_cannot_be_made_is_one_line_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DataError) as error:
        prepare_files("mnist", tmp_path / "a-file" / "data")
    raw = raw_folder("mnist", tmp_path / "a-file" / "data")
    assert str(error.value) == f"cannot create the data folder {raw}: Not a directory; set data.data_dir to a writable folder"


@pytest.mark.parametrize("name, array, message", [
    ("train-labels-idx1-ubyte.gz", np.full(600, 10, np.uint8), "has label 10, expected 0..9; replace it"),
    ("train-images-idx3-ubyte.gz", np.zeros((600, 32, 32), np.uint8), "holds images of shape (32, 32), expected (28, 28); replace it"),
])
def test_labels_out_of_range_and_images_of_another_size_are_refused(tmp_path, name, array, message):
    folder = write_dataset(tmp_path / "data")
    write_idx(folder / name, array)
    raw = prepare_files("mnist", folder)
    with pytest.raises(DataError) as error:
        load_split.__wrapped__("mnist", str(raw), train=True)
    assert str(error.value) == f"{raw / name.removesuffix('.gz')} {message}"


def test_no_files_and_no_network_names_folder_and_files(tmp_path):
    with pytest.raises(DataError) as error:
        prepare_files("mnist", tmp_path / "empty")
    message = str(error.value)
    assert message.startswith(f"mnist data not found in {tmp_path / 'empty'} and the download failed (")
    # torchvision's reason (here conftest's refusal), and the other folder the files may go into
    assert "the download failed (network disabled in tests); " in message
    assert f" or into {raw_folder('mnist', tmp_path / 'empty')}, " in message
    assert "\n" not in message and all(f in message for f in IDX_FILES)


def test_on_an_accelerator_the_data_lives_on_the_device(tiny_data):
    """What CUDA gets, checked with PyTorch's 'meta' device: tensors moved once, batches sliced there."""
    from types import SimpleNamespace

    dm = MNISTDataModule(data_dir=str(tiny_data), val_size=100)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")), global_rank=0,
                                 world_size=1, global_step=0, current_epoch=0)
    dm.prepare_data()
    dm.setup("fit")
    assert all(t.device.type == "meta" for xy in (dm.train_xy, dm.val_xy, dm.test_xy) for t in xy)
    x, y = next(iter(dm.train_dataloader()))
    assert x.device.type == "meta" and x.shape == (128, 784) and y.shape == (128, 10)
