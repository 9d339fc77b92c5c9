"""From a checkpoint to a plain network that gives ten probabilities, in plain PyTorch.

The one path that predict, the web page and export share: choosing and loading a checkpoint into
the plain network (src/network.py) and naming its classes. (Pictures are made into 28x28 images by
src/pictures.py.) Free of Lightning, so that each starts quickly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from src.errors import UserError, one_line
from src.run_files import LAST_CKPT, RUN_FOLDERS

if TYPE_CHECKING:  # torch itself is imported where it is used: bad input is refused before that (seconds)
    import torch


@dataclass
class LoadedModel:
    net: torch.nn.Module  # the plain network, in eval mode: images (n, 784) in [0, 1] -> logits (n, classes)
    hparams: dict  # the LightningModule's hyperparameters: hidden, num_classes, optimizer, ...
    data: dict  # the data module's: name (the dataset), data_dir, batch_size, ...
    classes: list[str]  # a short name per class: "3" for MNIST, "Dress" for Fashion-MNIST

    @property
    def dataset(self) -> str | None:
        return self.data.get("name")

    @property
    def summary(self) -> str:
        """What the entry points print about the model they use: "hidden=512, trained on mnist"."""
        return f"hidden={self.hparams['hidden']}, trained on {self.dataset or 'unknown data'}"

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 28, 28) or (n, 784) images in [0, 1] -> (n, classes) softmax probabilities, on the CPU."""
        import torch

        device = next(self.net.parameters()).device
        with torch.inference_mode():
            return self.net(images.reshape(len(images), -1).to(device)).softmax(dim=1).cpu()


def newest_checkpoint(folders: tuple[str, ...] = RUN_FOLDERS) -> Path:
    """The most recently written last.ckpt of any training run under `folders`."""
    found = [path for folder in folders for path in Path(folder).rglob(LAST_CKPT) if path.is_file()]
    if not found:
        raise UserError(f"no checkpoint found: no last.ckpt under {' or '.join(f + '/' for f in folders)} in "
                        f"{Path.cwd()}; train one with `python -m src.train`, or give ckpt_path=FILE")
    return max(found, key=lambda path: path.stat().st_mtime)


def chosen_checkpoint(ckpt_path: str | None) -> tuple[Path, str]:
    """The checkpoint an entry point uses, and how it was chosen: ckpt_path, else the newest last.ckpt."""
    if ckpt_path is not None:
        return Path(ckpt_path), "ckpt_path"
    return newest_checkpoint(), f"the newest last.ckpt under {', '.join(f + '/' for f in RUN_FOLDERS)}"


def check_device(device: str) -> None:
    """A device a model can run on here (cpu, cuda or mps), or one line saying to use the CPU."""
    if device == "cpu":  # always there: no need to import torch to ask, before the rest of the input is checked
        return
    import torch

    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[device]:
        raise UserError(f"device={device!r} is not available on this machine; use device=cpu")


def load_model(path: str | Path, device: str = "cpu") -> LoadedModel:
    """The network rebuilt from the checkpoint's own hyperparameters, with its class names."""
    from src.checkpoint import architecture, data_settings, load_checkpoint, network_weights

    checkpoint = load_checkpoint(path)  # a path that is no checkpoint fails here, before torch is imported
    from src.network import build_mlp

    try:
        net = build_mlp(*architecture(checkpoint))
        net.load_state_dict(network_weights(checkpoint))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = one_line(error)
        reason = reason if len(reason) <= 300 else reason[:300] + "…"
        raise UserError(f"ckpt_path={str(path)!r} holds a model of another architecture than this program's "
                        f"784 -> hidden -> 10 network ({reason})") from None
    hparams, data = dict(checkpoint["hyper_parameters"]), data_settings(checkpoint)
    return LoadedModel(net.eval().to(device), hparams, data, class_names(data.get("name"), hparams["num_classes"]))


# Short forms of torchvision's MNIST.classes ("3 - three" -> "3") and FashionMNIST.classes, written
# out so that predicting and serving need no torchvision, whose import alone takes about 1.8 s here
# (it pulls in torch._dynamo); tests/test_predict.py checks that they are still torchvision's.
CLASS_NAMES = {
    "mnist": [str(k) for k in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
}


def class_names(dataset: str | None, num_classes: int) -> list[str]:
    """A short name per class of the dataset a checkpoint was trained on; "0".."9" for unknown data."""
    return list(CLASS_NAMES.get(dataset) or (str(k) for k in range(num_classes)))
