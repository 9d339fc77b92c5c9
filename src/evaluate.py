"""Score a trained model: `python -m src.evaluate [ckpt_path=FILE] [split=test|val] [key=value ...]`.

The checkpoint's loss and accuracy on the test split, or on the validation split its training run
held out, printed as the training run prints them; written into the run's folder,
outputs/evaluate/DATE/TIME/: metrics.json, confusion_matrix.png (with each class's accuracy) and
mistakes.png, the most confidently wrong images, most confident first.

The plain network (src/inference.py) does the work, not a Trainer, because it is simpler: the
gallery needs every image's probabilities, which Trainer.test() does not return, and a Trainer
would also start loggers and checkpoint callbacks that must be switched off here. The images go
through the network in batches of the training run's size, and torchmetrics averages loss and
accuracy with the same metrics the LightningModule uses, so the checkpoint a training run tested
gets the figures that run printed. Lightning is never imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from src.atomic import written_whole
from src.cli import entry_point
from src.config import EvaluateConfig, validated
from src.errors import UserError
from src.inference import check_device, chosen_checkpoint, load_model
from src.run_context import RunContext
from src.run_files import CONFUSION_MATRIX

if TYPE_CHECKING:  # torch itself is imported where it is used: bad input is refused before that (seconds)
    import torch


@dataclass
class Evaluation:
    split: str
    n: int
    loss: float
    acc: float
    per_class_acc: dict[str, float | None]  # None for a class the split has no image of
    mistakes: list[dict] = field(default_factory=list)  # the gallery, most confident first
    files: list[Path] = field(default_factory=list)


def evaluate(cfg: DictConfig, run_dir: str | Path) -> Evaluation:
    """Score the configured checkpoint on the configured split; print the figures and write the files."""
    config: EvaluateConfig = validated(cfg)
    check_device(config.device)
    ckpt_path, source = chosen_checkpoint(config.ckpt_path)
    model = load_model(ckpt_path, config.device)
    images, labels, names = _split_images(ckpt_path, model.data, config)
    print(f"checkpoint: {ckpt_path} ({source}; {model.summary})")
    batch_size = config.batch_size or model.data.get("batch_size") or 128
    logits, loss, acc, confusion = _score(model.net, images, labels, batch_size)

    true = labels.argmax(dim=1)
    predicted = logits.argmax(dim=1)  # as the accuracy metric counts it
    probability = logits.softmax(dim=1).gather(1, predicted[:, None]).squeeze(1)
    wrong = (predicted != true).nonzero().squeeze(1)
    # Most confident first; among equal probabilities, in the split's order.
    shown = wrong[probability[wrong].sort(descending=True, stable=True).indices][: config.gallery].tolist()
    classes = model.classes
    counts = confusion.sum(dim=1)
    per_class = {c: (float(confusion[k, k] / counts[k]) if counts[k] else None) for k, c in enumerate(classes)}
    mistakes = [{"image": names[i], "true": classes[true[i]], "predicted": classes[predicted[i]],
                 "probability": float(probability[i])} for i in shown]
    result = Evaluation(config.split, len(images), loss, acc, per_class, mistakes)

    print(f"{model.dataset} {config.split} split: {len(images)} images, {len(wrong)} wrong")
    print(f"{config.split}_loss: {loss:.4f} {config.split}_acc: {acc:.4f}")

    from src import plots

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result.files.append(plots.confusion_matrix(confusion, classes, run_dir / CONFUSION_MATRIX, config.split))
    if shown:
        title = (f"the {len(shown)} most confidently wrong of {len(images)} {model.dataset} {config.split} images "
                 f"({len(wrong)} wrong)")
        result.files.append(plots.mistakes(images[shown], [names[i] for i in shown], true[shown].tolist(),
                                           predicted[shown].tolist(), probability[shown].tolist(), classes,
                                           run_dir / "mistakes.png", title))
    metrics = {"ckpt_path": str(ckpt_path), "split": config.split, "n": len(images), "loss": loss, "acc": acc,
               "per_class_acc": per_class, "dataset": model.dataset, "batch_size": batch_size, "mistakes": mistakes}
    with written_whole(run_dir / "metrics.json") as partial:
        partial.write_text(json.dumps(metrics, indent=1) + "\n")
    result.files.append(run_dir / "metrics.json")
    here = Path.cwd().resolve()
    shown_dir = run_dir.resolve().relative_to(here) if run_dir.resolve().is_relative_to(here) else run_dir
    note = "" if shown else " (no image was wrong: no gallery)" if not len(wrong) else " (gallery=0: no gallery)"
    print(f"wrote {', '.join(f.name for f in result.files)} into {shown_dir}/{note}")
    return result


def _split_images(ckpt_path: Path, data: dict, config: EvaluateConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The split's images (n, 784) and one-hot labels, prepared as for training, and each image's name."""
    from src.idx import DATASET_CLASSES, load_split, prepare_files, validation_split

    name = data.get("name")
    if name not in DATASET_CLASSES:
        raise UserError(f"ckpt_path={str(ckpt_path)!r} does not record the dataset it was trained on, "
                        "so there is no split to score it on")
    val_size = data.get("val_size") or 0
    if config.split == "val" and not val_size:
        raise UserError(f"split='val' is not valid: {ckpt_path} was trained without a validation split "
                        "(data.val_size=0); use split=test")
    raw = prepare_files(name, config.data_dir or data.get("data_dir") or "data")
    x, y = load_split(name, str(raw), train=config.split == "val")
    if config.split == "test":
        return x, y, [f"test[{i}]" for i in range(len(x))]
    _, held_out = validation_split(len(x), val_size, data["seed"])  # the data module's own split
    # Named by their place in the training images, where `python -m src.predict idx=N` finds them.
    return x[held_out], y[held_out], [f"train[{i}]" for i in held_out.tolist()]


def _score(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """Logits of every image, and loss, accuracy and confusion counts computed as src/model.py's test step does."""
    import torch
    import torch.nn.functional as F
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

    num_classes = y.shape[1]
    mean_loss = MeanMetric(nan_strategy="disable")
    accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
    confusion = MulticlassConfusionMatrix(num_classes=num_classes, validate_args=False)
    device = next(net.parameters()).device
    logits = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
            out = net(xb)
            loss = F.cross_entropy(out, yb)  # against the one-hot targets, as in training
            out, labels = out.cpu(), yb.argmax(dim=1).cpu()
            # The LightningModule's own call, so that the two agree: the epoch's loss is the batch means' mean
            # (torchmetrics 1.9 would ignore a weight under nan_strategy="disable", issue 3434).
            mean_loss.update(loss.cpu())
            accuracy.update(out, labels)
            confusion.update(out, labels)
            logits.append(out)
    return torch.cat(logits), mean_loss.compute().item(), accuracy.compute().item(), confusion.compute()


@entry_point("evaluate")
def main(cfg: DictConfig, context: RunContext) -> None:
    evaluate(cfg, context.output_dir)


if __name__ == "__main__":
    main()
