"""The typed schema of conf/*.yaml and the one-line errors every entry point reports.

Hydra checks keys and types against these dataclasses while it composes the config;
`__post_init__` checks ranges when `OmegaConf.to_object` builds them, before any work starts.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

DATASETS = ("mnist", "fashion_mnist")
OPTIMIZERS = ("rmsprop", "adam", "sgd")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


class UserError(Exception):
    """Bad input: reported as one line and a non-zero exit, never as a traceback."""


# Terminal escape sequences (colours, bold: PyTorch's weights_only message has them) and other
# control characters, which foreign text may carry into an error line.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def one_line(text: object) -> str:
    """Text fit for a one-line error: escape codes and control characters removed, whitespace collapsed."""
    return " ".join(_ESCAPES.sub("", str(text)).split())


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise UserError(f"{key}={value!r} is not valid: {valid}")


@dataclass
class DataConfig:
    name: str = "mnist"
    data_dir: str = "data"
    batch_size: int = 128
    val_size: int = 0

    def __post_init__(self) -> None:
        _check(self.name in DATASETS, "data.name", self.name, f"expected one of {', '.join(DATASETS)}")
        _check(self.batch_size > 0, "data.batch_size", self.batch_size, "expected a positive integer")
        _check(self.val_size >= 0, "data.val_size", self.val_size, "expected 0 (no validation split) or more")


@dataclass
class ModelConfig:
    hidden: int = 512
    compile: bool = False  # compile the network with torch.compile (nn.Module.compile, in place)

    def __post_init__(self) -> None:
        _check(self.hidden > 0, "model.hidden", self.hidden, "expected a positive integer")


@dataclass
class OptimizerConfig:
    """Keras names and defaults; each optimizer reads the fields it has."""

    name: str = "rmsprop"
    lr: float = 1e-3
    rho: float = 0.9  # rmsprop's decay of the squared-gradient average (torch calls it alpha)
    eps: float = 1e-7
    momentum: float = 0.0  # sgd
    beta1: float = 0.9  # adam
    beta2: float = 0.999  # adam

    def __post_init__(self) -> None:
        _check(self.name in OPTIMIZERS, "optimizer.name", self.name, f"expected one of {', '.join(OPTIMIZERS)}")
        _check(self.lr > 0, "optimizer.lr", self.lr, "expected a number > 0")
        _check(0 <= self.rho < 1, "optimizer.rho", self.rho, "expected 0 <= rho < 1")
        _check(self.eps > 0, "optimizer.eps", self.eps, "expected a number > 0")
        _check(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "expected 0 <= momentum < 1")
        _check(0 <= self.beta1 < 1, "optimizer.beta1", self.beta1, "expected 0 <= beta1 < 1")
        _check(0 <= self.beta2 < 1, "optimizer.beta2", self.beta2, "expected 0 <= beta2 < 1")


@dataclass
class TrainerConfig:
    """The lightning.Trainer arguments a run may set; passed to it as keyword arguments."""

    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    max_epochs: int = 5
    precision: Optional[str] = None
    limit_train_batches: Any = None  # an int counts batches, a float is a fraction
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    fast_dev_run: bool = False
    deterministic: Optional[bool] = None
    enable_progress_bar: bool = True

    def __post_init__(self) -> None:
        _check(self.accelerator in ACCELERATORS, "trainer.accelerator", self.accelerator,
               f"expected one of {', '.join(ACCELERATORS)}")
        _check(self.max_epochs >= 0, "trainer.max_epochs", self.max_epochs, "expected 0 or more")
        _check(self.num_nodes >= 1, "trainer.num_nodes", self.num_nodes, "expected 1 or more")
        devices_ok = self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1) or (
            isinstance(self.devices, list) and all(isinstance(d, int) and d >= 0 for d in self.devices))
        _check(devices_ok, "trainer.devices", self.devices, "expected a count >= 1, a list of device ids, or 'auto'")


@dataclass
class LoggerConfig:
    """Loggers beside the CSV logger (metrics.csv is always written): conf/logger/*.yaml.

    Flags rather than one name, so that logger=[tensorboard,mlflow] merges two options into one node.
    """

    tensorboard: bool = False
    mlflow: bool = False
    tracking_uri: str = "sqlite:///mlruns.db"  # MLflow's store: a database URI, a folder or http://HOST:PORT
    experiment_name: Optional[str] = None  # None: the entry point's name

    def __post_init__(self) -> None:
        _check(self.tracking_uri.strip() != "", "logger.tracking_uri", self.tracking_uri,
               "expected an MLflow tracking URI, e.g. sqlite:///mlruns.db or http://HOST:5000")
        _check(self.experiment_name is None or self.experiment_name.strip() != "", "logger.experiment_name",
               self.experiment_name, "expected a name, or null for the entry point's name")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 42
    ckpt_path: Optional[str] = None  # resume training from this checkpoint
    optimized_metric: Optional[str] = None  # what main returns to a sweep; None: val/acc with a val split, else test/acc

    def __post_init__(self) -> None:
        metrics = ("val/acc", "val/loss", "test/acc", "test/loss", "train/acc", "train/loss")
        _check(self.optimized_metric in (None, *metrics), "optimized_metric", self.optimized_metric,
               f"expected one of {', '.join(metrics)}")


ConfigStore.instance().store(group="schema", name="train", node=TrainConfig, package="_global_")


def sweep_metric(cfg) -> str:
    """What a training run returns to a sweep (and the summary ranks by), for a composed or built config."""
    return cfg.optimized_metric or ("val/acc" if cfg.data.val_size > 0 else "test/acc")


SPLITS = ("train", "test")
PREDICT_DEVICES = ("cpu", "cuda", "mps")


@dataclass
class PredictConfig:
    ckpt_path: Optional[str] = None  # None: the newest last.ckpt under outputs/ and multirun/
    idx: Any = None  # an index or a list of them; None: 3, the original's image, unless `image` is given
    split: str = "train"
    image: Optional[str] = None  # a picture of a digit to classify instead of a dataset image
    data_dir: Optional[str] = None  # None: the folder the checkpoint's training run read
    device: str = "cpu"
    show: bool = False  # also open the figure in a window where a display exists

    def __post_init__(self) -> None:
        _check(self.split in SPLITS, "split", self.split, f"expected one of {', '.join(SPLITS)}")
        _check(self.device in PREDICT_DEVICES, "device", self.device, f"expected one of {', '.join(PREDICT_DEVICES)}")
        indices = self.idx if isinstance(self.idx, list) else [self.idx]
        _check(self.idx is None or (len(indices) > 0 and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)),
            "idx", self.idx, "expected an image index (0 or more) or a list of them, e.g. idx=3 or idx=[3,4,5]")
        _check(self.image is None or self.image.strip() != "", "image", self.image, "expected the path of an image file")
        if self.image is not None and self.idx is not None:
            raise UserError("idx and image were both given: classify dataset images (idx=...) or your own image (image=...)")


ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


EXPORT_FORMATS = ("onnx", "torchscript")


@dataclass
class ExportConfig:
    ckpt_path: Optional[str] = None  # None: the newest last.ckpt under outputs/ and multirun/
    format: str = "onnx"
    out: Optional[str] = None  # None: model.onnx (model.pt for torchscript) beside the checkpoint
    data_dir: Optional[str] = None  # the test images of the parity check; None: the folder the training run read

    def __post_init__(self) -> None:
        _check(self.format in EXPORT_FORMATS, "format", self.format, f"expected one of {', '.join(EXPORT_FORMATS)}")
        _check(self.out is None or self.out.strip() != "", "out", self.out, "expected the path of the file to write")
        _check(self.data_dir is None or self.data_dir.strip() != "", "data_dir", self.data_dir,
               "expected a folder holding the dataset's files")


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


@dataclass
class AppConfig:
    ckpt_path: Optional[str] = None  # None: the newest last.ckpt under outputs/ and multirun/
    host: str = "127.0.0.1"  # 0.0.0.0 serves other machines too
    port: int = 7860

    def __post_init__(self) -> None:
        _check(self.host.strip() != "", "host", self.host, "expected an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
        _check(1 <= self.port <= 65535, "port", self.port, "expected a TCP port from 1 to 65535")


ConfigStore.instance().store(name="app_schema", node=AppConfig)


def validated(cfg):
    """The composed config as its schema's dataclass, every value checked.

    Hydra rejects unknown keys given as key=value, but accepts them as +key=value and
    OmegaConf.to_object then drops them silently; a typo must not be ignored.
    """
    from omegaconf import DictConfig, OmegaConf

    def check_keys(node, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        if not is_dataclass(schema):
            return
        known = [f.name for f in fields(schema)]
        for key in node.keys():
            if key not in known:
                raise UserError(f"{prefix}{key} is not a known key: valid keys{' of ' + prefix[:-1] if prefix else ''} "
                                f"are {', '.join(known)}")
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                check_keys(child, f"{prefix}{key}.")

    check_keys(cfg, "")
    return OmegaConf.to_object(cfg)


_ONE_LINE = "_MNIST_ONE_LINE_ERRORS"  # set while run_hydra made Hydra raise config errors


def _one_line(error: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages, and their causes, as one line."""
    lines: list[str] = []
    while error is not None:
        for line in str(error).splitlines():
            line = line.strip()
            noise = ("full_key:", "reference_type=", "object_type=", "Config search path", "provider=",
                     "Set the environment", "To append")
            if line and not line.startswith(noise) and line not in lines:
                lines.append(line)
        error = error.__cause__
    text = "; ".join(lines)
    unknown = re.search(r"Key '\w+' not in '(\w+)'", text)
    schema = globals().get(unknown.group(1)) if unknown else None
    if is_dataclass(schema):
        text += f"; valid keys are {', '.join(f.name for f in fields(schema))}"
    # "Available options in 'optimizer':; adam; rmsprop" -> "Available options in 'optimizer': adam, rmsprop"
    return re.sub(r":; (.*)$", lambda m: ": " + m.group(1).replace("; ", ", "), text)


def run_hydra(hydra_main) -> None:
    """Run a @hydra.main function so that config errors print one line and exit 1.

    Hydra prints a bad override, an unknown key, a wrong type or a missing group option over
    several lines. With HYDRA_FULL_ERROR=1 it raises them instead, so they are caught here;
    the task wrapper restores the user's setting once the config is composed.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from src.extras import check_launcher

    try:
        check_launcher(sys.argv[1:])  # before Hydra, which would only say it cannot find the launcher
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(1)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for full tracebacks
        return hydra_main()
    os.environ["HYDRA_FULL_ERROR"] = os.environ[_ONE_LINE] = "1"
    try:
        return hydra_main()
    except (HydraException, OmegaConfBaseException) as error:
        print(f"error: {one_line(_one_line(error))}", file=sys.stderr)
        sys.exit(1)
    finally:
        _stop_one_line_errors()


def _stop_one_line_errors() -> None:
    """Give HYDRA_FULL_ERROR back to the user, if run_hydra set it (once: the first caller does it)."""
    if os.environ.pop(_ONE_LINE, None):
        os.environ.pop("HYDRA_FULL_ERROR", None)


def exit_on_user_error(task):
    """Wrap a Hydra task: a UserError becomes one line on stderr and exit status 1.

    In a multirun the error is re-raised instead, so that Hydra records the job as failed
    and the sweep goes on with the next job.
    """

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        _stop_one_line_errors()  # composed: bugs in the task keep Hydra's usual report
        try:
            return task(*args, **kwargs)
        except UserError as error:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            print(f"error: {one_line(error)}", file=sys.stderr)
            sys.exit(1)

    return wrapper
