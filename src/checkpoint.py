"""Reading checkpoints that may come from anywhere: tensors and plain values only, clear errors.

Also the one reader of a checkpoint's layout: the network's weights under `net.`, its shape in the
LightningModule's hyperparameters, the dataset in the data module's. Kept free of Lightning so that
`python -m src.predict` starts quickly.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from src.errors import UserError, one_line

if TYPE_CHECKING:
    import torch

NET_PREFIX = "net."  # MNISTClassifier keeps the network as `net`: its weights are "net.0.weight", ...
FIRST_LAYER = f"{NET_PREFIX}0.weight"  # (hidden, input_size): the shape that tells two models apart


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True: a pickle that would build arbitrary objects (and so
    could run code) is refused before any of it runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ckpt_path={str(path)!r} is not valid: no such file")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise UserError(f"ckpt_path={str(path)!r} is not a checkpoint: expected a file written by python -m src.train")
    import torch  # here, not at the top: `python -m src.train` checks its config and fails on bad input without it

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # PyTorch's message runs over many lines (with terminal escape codes); the blocked name says it all.
        blocked = re.search(r"GLOBAL ([\w.]+)", str(error))
        reason = f"it would call or build {blocked.group(1)}" if blocked else one_line(error)[:160] or "unsafe content"
        raise UserError(f"ckpt_path={str(path)!r} was refused: it holds more than tensors and plain values "
                        f"and is not loaded ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(f"ckpt_path={str(path)!r} is not a checkpoint this program can read "
                        f"({one_line(str(error).splitlines()[0])[:160] if str(error) else type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise UserError(f"ckpt_path={str(path)!r} is not a checkpoint of this program: "
                        "expected a Lightning checkpoint written by python -m src.train")
    return checkpoint


def check_architecture(checkpoint: dict, path: str | Path, model: torch.nn.Module) -> None:
    """A checkpoint of another shape gets one line naming the difference, not a shape-mismatch traceback."""
    import torch

    theirs = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if torch.is_tensor(v)}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if theirs != ours:
        hidden = checkpoint["hyper_parameters"].get("hidden")
        raise UserError(f"ckpt_path={str(path)!r} holds a model of another architecture "
                        f"(hidden={hidden}, weights {theirs.get(FIRST_LAYER)}) than this run's "
                        f"(hidden={getattr(model, 'hparams', {}).get('hidden')}, weights {ours.get(FIRST_LAYER)}); "
                        "set model.hidden to match it, or start without ckpt_path")


def check_optimizer(checkpoint: dict, path: str | Path, name: str) -> None:
    """Resuming restores the optimizer's state, which only the same optimizer can take (Adam's moments are not
    RMSprop's averages): another one gets one line naming both, not a KeyError from inside its step."""
    theirs = checkpoint["hyper_parameters"].get("optimizer")
    if theirs is not None and theirs != name:
        raise UserError(f"ckpt_path={str(path)!r} was trained with optimizer={theirs}, and resuming goes on with its "
                        f"state, which optimizer={name} cannot take: resume with optimizer={theirs} (or the experiment= "
                        "it was trained with), or start without ckpt_path")


def architecture(checkpoint: dict) -> tuple[int, int, int]:
    """(input_size, hidden, num_classes) of the checkpoint's network; KeyError if it does not say."""
    hparams = checkpoint["hyper_parameters"]
    return hparams["input_size"], hparams["hidden"], hparams["num_classes"]


def network_weights(checkpoint: dict) -> dict:
    """The plain network's state dict: the LightningModule's `net.` weights (its metrics hold none)."""
    return {k.removeprefix(NET_PREFIX): v for k, v in checkpoint["state_dict"].items() if k.startswith(NET_PREFIX)}


def data_settings(checkpoint: dict) -> dict:
    """The data module's hyperparameters: `name` (the dataset), `data_dir`, `val_size`, `seed`, ...; {} if none."""
    return dict(checkpoint.get("datamodule_hyper_parameters") or {})
