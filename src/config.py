"""The typed schema of conf/*.yaml, and the validation of a composed config.

Hydra checks keys and types against these dataclasses while it composes the config;
`__post_init__` checks ranges when `OmegaConf.to_object` builds them, before any work starts.
Importing this module registers the schemas in Hydra's ConfigStore (compose needs them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from src.errors import UserError

DATASETS = ("mnist", "fashion_mnist")
LABELS = ("one_hot", "integer")  # to_categorical's one-hot rows (the 1st edition), or the digits themselves (2nd, 3rd)
OPTIMIZERS = ("rmsprop", "adam", "sgd")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PROGRESS = ("auto", "bar", "lines")  # src/console.py: a bar on a terminal, one line per epoch elsewhere


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise UserError(f"{key}={value!r} is not valid: {valid}")


@dataclass
class DataConfig:
    name: str = "mnist"
    data_dir: str = "data"
    batch_size: int = 128
    val_size: int = 0
    labels: str = "one_hot"

    def __post_init__(self) -> None:
        _check(self.name in DATASETS, "data.name", self.name, f"expected one of {', '.join(DATASETS)}")
        _check(self.labels in LABELS, "data.labels", self.labels, f"expected one of {', '.join(LABELS)}")
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
    """The lightning.Trainer arguments a run may set (lightning_arguments()), and rendezvous_timeout_s."""

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
    # Not a Trainer argument: how long the processes of trainer.strategy=ddp wait to meet (src/rendezvous.py).
    rendezvous_timeout_s: int = 300

    def __post_init__(self) -> None:
        _check(self.accelerator in ACCELERATORS, "trainer.accelerator", self.accelerator,
               f"expected one of {', '.join(ACCELERATORS)}")
        _check(self.max_epochs >= 0, "trainer.max_epochs", self.max_epochs, "expected 0 or more")
        _check(self.num_nodes >= 1, "trainer.num_nodes", self.num_nodes, "expected 1 or more")
        devices_ok = self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1) or (
            isinstance(self.devices, list) and all(isinstance(d, int) and d >= 0 for d in self.devices))
        _check(devices_ok, "trainer.devices", self.devices, "expected a count >= 1, a list of device ids, or 'auto'")
        _check(self.rendezvous_timeout_s >= 1, "trainer.rendezvous_timeout_s", self.rendezvous_timeout_s,
               "expected a whole number of seconds, 1 or more")

    def lightning_arguments(self) -> dict[str, Any]:
        """The keyword arguments of lightning.Trainer: those set, without rendezvous_timeout_s (not Lightning's)."""
        arguments = {key: value for key, value in asdict(self).items() if value is not None}
        del arguments["rendezvous_timeout_s"]
        return arguments


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
class EarlyStoppingConfig:
    """Lightning's EarlyStopping on val/acc: training stops once val/acc has not risen by more than
    min_delta for `patience` epochs in a row."""

    enabled: bool = False
    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _check(self.patience >= 1, "early_stopping.patience", self.patience, "expected 1 or more epochs")
        _check(self.min_delta >= 0, "early_stopping.min_delta", self.min_delta, "expected a number >= 0")


TEST_CKPTS = ("best", "last")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    seed: int = 42
    ckpt_path: Optional[str] = None  # resume training from this checkpoint
    optimized_metric: Optional[str] = None  # what main returns to a sweep; None: val/acc with a val split, else test/acc
    test_ckpt: Optional[str] = None  # the weights tested: best or last; None: best with a val split, else last
    progress: str = "auto"  # auto: a bar on a terminal, one line per epoch elsewhere; bar; lines

    def __post_init__(self) -> None:
        _check(self.progress in PROGRESS, "progress", self.progress,
               f"expected one of {', '.join(PROGRESS)} (auto: a bar on a terminal, one line per epoch otherwise)")
        metrics = ("val/acc", "val/loss", "test/acc", "test/loss", "train/acc", "train/loss")
        _check(self.optimized_metric in (None, *metrics), "optimized_metric", self.optimized_metric,
               f"expected one of {', '.join(metrics)}")
        _check(self.test_ckpt in (None, *TEST_CKPTS), "test_ckpt", self.test_ckpt,
               f"expected one of {', '.join(TEST_CKPTS)}, or null for best with a validation split, else last")
        no_val = "needs a validation split: set data.val_size (e.g. data.val_size=10000)"
        _check(self.test_ckpt != "best" or self.data.val_size > 0, "test_ckpt", self.test_ckpt,
               f"the best epoch is chosen on val/acc, which {no_val}, or use test_ckpt=last")
        if self.early_stopping.enabled and self.data.val_size == 0:
            raise UserError(f"early_stopping.enabled=true is not valid: early stopping watches val/acc, which {no_val}")
        _check(not (self.optimized_metric or "").startswith("val/") or self.data.val_size > 0, "optimized_metric",
               self.optimized_metric, f"a validation metric {no_val}, or use test/acc")
        # 0 batches (an int or a float) turns the loop off, and what the run returns and prints comes from it.
        _check(self.data.val_size == 0 or self.trainer.limit_val_batches != 0, "trainer.limit_val_batches",
               self.trainer.limit_val_batches, f"validation is what data.val_size={self.data.val_size} holds images out "
               "for (val/acc, the best epoch): expected a count or fraction above 0, or data.val_size=0")
        _check(self.trainer.limit_test_batches != 0, "trainer.limit_test_batches", self.trainer.limit_test_batches,
               "every run ends by testing (its test_loss and test_acc line, the confusion matrix): expected a count "
               "or fraction above 0, or null for the whole test split")


ConfigStore.instance().store(group="schema", name="train", node=TrainConfig, package="_global_")


def sweep_metric(cfg) -> str:
    """What a training run returns to a sweep (and the summary ranks by), for a composed or built config."""
    return cfg.optimized_metric or ("val/acc" if cfg.data.val_size > 0 else "test/acc")


def tested_checkpoint(cfg) -> str:
    """Which weights a training run tests, for a composed or built config: "best" (by val/acc) or "last"."""
    return cfg.test_ckpt or ("best" if cfg.data.val_size > 0 else "last")


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


EVALUATE_SPLITS = ("test", "val")


@dataclass
class EvaluateConfig:
    ckpt_path: Optional[str] = None  # None: the newest last.ckpt under outputs/ and multirun/
    split: str = "test"  # or val: the validation split the checkpoint's training run held out
    data_dir: Optional[str] = None  # None: the folder the checkpoint's training run read
    device: str = "cpu"
    batch_size: Optional[int] = None  # None: the training run's data.batch_size, so the figures are the run's
    gallery: int = 25  # how many of the most confidently wrong images to show

    def __post_init__(self) -> None:
        _check(self.split in EVALUATE_SPLITS, "split", self.split, f"expected one of {', '.join(EVALUATE_SPLITS)}")
        _check(self.device in PREDICT_DEVICES, "device", self.device, f"expected one of {', '.join(PREDICT_DEVICES)}")
        _check(self.data_dir is None or self.data_dir.strip() != "", "data_dir", self.data_dir,
               "expected a folder holding the dataset's files")
        _check(self.batch_size is None or self.batch_size > 0, "batch_size", self.batch_size,
               "expected a positive integer, or null for the training run's")
        _check(self.gallery >= 0, "gallery", self.gallery, "expected 0 (no gallery) or more images")


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


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
