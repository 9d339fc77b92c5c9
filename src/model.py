"""The LightningModule: Keras's Dense(512, relu) -> Dense(10, softmax), its loss, metrics and optimizer."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from src.config import OptimizerConfig
from src.errors import UserError
from src.network import build_mlp, keras_optimizer

# Cross-entropy over 10 classes starts near ln(10) = 2.3; an epoch mean above this means the
# logits have exploded (Keras's RMSprop normalises steps, so even lr=1e6 stays finite).
DIVERGED_LOSS = 1e4


class MNISTClassifier(L.LightningModule):
    """784 -> hidden (ReLU) -> 10. forward returns logits; predict_step returns probabilities.

    Every argument is a plain number or string, so a checkpoint's hyperparameters load with
    torch.load(weights_only=True) and rebuild the model without Hydra. `optimizer_settings` are the
    other fields of src.config.OptimizerConfig (lr, rho, eps, momentum, beta1, beta2), Keras's
    defaults where left out.
    """

    def __init__(self, hidden: int = 512, optimizer: str = "rmsprop", input_size: int = 28 * 28,
                 num_classes: int = 10, **optimizer_settings: float):
        super().__init__()
        self.automatic_optimization = False  # see training_step
        self.save_hyperparameters()
        self.optimizer_settings = OptimizerConfig(name=optimizer, **optimizer_settings)
        self.net = build_mlp(input_size, hidden, num_classes)
        # One image: Lightning's model summary runs it through the network for its output shapes and FLOPs.
        self.example_input_array = torch.zeros(1, input_size)
        # Metrics accumulate on the device with no sync per step; they are computed locally
        # (the progress bar reads them mid-epoch on one process) and averaged over processes
        # when logged at epoch end.
        metric = dict(sync_on_compute=False)
        accuracy = dict(num_classes=num_classes, average="micro", validate_args=False, **metric)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_loss", MeanMetric(nan_strategy="disable", **metric))
            setattr(self, f"{stage}_acc", MulticlassAccuracy(**accuracy))
        self.confusion = MulticlassConfusionMatrix(num_classes=num_classes, validate_args=False)
        self.test_confusion: torch.Tensor | None = None  # (true, predicted) counts of the last test run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _metrics(self, stage: str) -> tuple[MeanMetric, MulticlassAccuracy]:
        return getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")

    def _step(self, stage: str, batch) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        # Keras's categorical_crossentropy on softmax outputs (one-hot rows y), or its
        # sparse_categorical_crossentropy (integer labels y): F.cross_entropy takes either, from logits.
        loss = F.cross_entropy(logits, y)
        labels = y.argmax(dim=1) if y.ndim == 2 else y
        mean_loss, accuracy = self._metrics(stage)
        # No weight=len(x): torchmetrics 1.9 ignores it under nan_strategy="disable" (the epoch's loss is
        # the mean of the batch means either way), and on a GPU the Python number was copied from the host,
        # with a wait, every step.
        mean_loss.update(loss.detach())
        accuracy.update(logits.detach(), labels)
        if stage == "test":
            self.confusion.update(logits.detach(), labels)
        return loss

    def training_step(self, batch, batch_idx):
        # The update written out, as in a hand-written loop: Lightning's automatic optimization
        # wraps it in a closure and more hooks, which made an epoch 3-4% slower (bench/speed.py).
        optimizer = self.optimizers()
        loss = self._step("train", batch)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def validation_step(self, batch, batch_idx):
        self._step("val", batch)

    def test_step(self, batch, batch_idx):
        self._step("test", batch)

    def predict_step(self, batch, batch_idx=0):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(dim=1)

    def running_metrics(self, stage: str = "train") -> dict[str, float]:
        """Means over the epoch so far, as Keras's progress bar shows them."""
        mean_loss, accuracy = self._metrics(stage)
        if mean_loss.update_count == 0:
            return {}
        return {"loss": mean_loss.compute().item(), "acc": accuracy.compute().item()}

    def _log_epoch(self, stage: str) -> None:
        mean_loss, accuracy = self._metrics(stage)
        self.log_dict({f"{stage}/loss": mean_loss.compute(), f"{stage}/acc": accuracy.compute()}, sync_dist=True)
        mean_loss.reset()
        accuracy.reset()

    def on_train_epoch_end(self) -> None:
        self._stop_if_diverged()  # Lightning runs this before the epoch's checkpoint is written
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count:
            self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        self.test_confusion = self.confusion.compute().cpu()
        self.confusion.reset()

    def _stop_if_diverged(self) -> None:
        loss = self.train_loss.compute().item() if self.train_loss.update_count else 0.0
        weights_finite = all(torch.isfinite(p).all() for p in self.parameters())
        if not weights_finite or not math.isfinite(loss) or loss > DIVERGED_LOSS:
            what = "the weights are no longer finite" if not weights_finite else f"train/loss reached {loss:.3g}"
            raise DivergedError(f"training diverged in epoch {self.current_epoch + 1}: {what} "
                                f"(optimizer.lr={self.optimizer_settings.lr} is likely too large); no checkpoint of it was written")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Every save passes here (after validation, on Ctrl-C): a diverged model is never written.
        self._stop_if_diverged()

    def configure_optimizers(self):
        return keras_optimizer(self.parameters(), self.optimizer_settings)


class DivergedError(UserError):
    """The loss or the weights became NaN or infinite."""
