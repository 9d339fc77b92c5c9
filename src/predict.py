"""Classify images with a trained model: `python -m src.predict [idx=3 | idx=[3,4,5] | image=PATH] [key=value ...]`.

As the original program ends: each image's 10 softmax probabilities, the predicted class
and the true label are printed, and a figure of the probabilities beside the 28x28 image
is saved into the run's folder, outputs/predict/DATE/TIME/. No Trainer is started.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from src.cli import entry_point
from src.config import PredictConfig, validated
from src.errors import UserError
from src.inference import check_device, chosen_checkpoint, load_model
from src.pictures import read_image
from src.run_context import RunContext

if TYPE_CHECKING:  # torch itself is imported where it is used: bad input is refused before that (seconds)
    import torch

ORIGINAL_IDX = 3  # the original program classifies train_images[3]


@dataclass
class Prediction:
    name: str  # "train[3]" or the image file's name
    image: torch.Tensor  # (28, 28) in [0, 1], light on dark: what the model saw
    probabilities: torch.Tensor  # (num_classes,), summing to 1
    label: int | None  # the true class of a dataset image
    figure: Path | None = None


def _describe(k: int, classes: list[str]) -> str:
    return str(k) if classes[k] == str(k) else f"{k} ({classes[k]})"


def predict(cfg: DictConfig, run_dir: str | Path) -> list[Prediction]:
    """Classify the configured images, print the results and save one figure per image."""
    config: PredictConfig = validated(cfg)
    check_device(config.device)
    own_image = read_image(config.image) if config.image is not None else None
    ckpt_path, source = chosen_checkpoint(config.ckpt_path)
    model = load_model(ckpt_path, config.device)
    dataset, classes = model.dataset, model.classes

    if own_image is not None:
        images, labels = own_image[None], [None]
        names, titles = [Path(config.image).name], [f"{Path(config.image).name} as the model saw it"]
        stems = [Path(config.image).stem]
    else:
        indices = config.idx if isinstance(config.idx, list) else [ORIGINAL_IDX if config.idx is None else config.idx]
        images, labels = _dataset_images(ckpt_path, model.data, config, indices)
        names = titles = [f"{dataset} {config.split}[{i}]" for i in indices]
        stems = [f"{config.split}_{i}" for i in indices]
    print(f"checkpoint: {ckpt_path} ({source}; {model.summary})")
    probabilities = model.probabilities(images)

    from src import plots

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    predictions = []
    for name, title, stem, image, p, label in zip(names, titles, stems, images, probabilities, labels):
        predicted = int(p.argmax())
        print(f"{name}:")
        print(f"  probabilities: [{', '.join(f'{v:.8f}' for v in p.tolist())}]")
        print(f"  predicted: {_describe(predicted, classes)}, probability {float(p[predicted]):.4f}")
        if label is not None:
            print(f"  true label: {_describe(label, classes)}")
        figure = plots.prediction(p, classes, image, run_dir / f"prediction_{stem}.png", title=title, label=label,
                                  keep_open=config.show)
        print(f"  figure: {figure.relative_to(Path.cwd()) if figure.is_relative_to(Path.cwd()) else figure}")
        predictions.append(Prediction(name, image, p, label, figure))
    if config.show and not plots.show_open_figures():
        print("show=true: no display found, so no window was opened; the figures are saved as above")
    return predictions


def _dataset_images(ckpt_path: Path, data: dict, config: PredictConfig, indices: list[int]):
    """The split's images at `indices` as (n, 28, 28), preprocessed exactly as for training, and their labels."""
    from src.idx import DATASET_CLASSES, load_split, prepare_files

    name = data.get("name")
    if name not in DATASET_CLASSES:
        raise UserError(f"ckpt_path={str(ckpt_path)!r} does not record the dataset it was trained on; "
                        "classify your own picture with image=PATH")
    raw = prepare_files(name, config.data_dir or data.get("data_dir") or "data")
    x, y = load_split(name, str(raw), train=config.split == "train")
    out_of_range = [i for i in indices if i >= len(x)]
    if out_of_range:
        raise UserError(f"idx={out_of_range[0]} is out of range: the {config.split} split of {name} has {len(x)} "
                        f"images, so idx goes from 0 to {len(x) - 1}")
    import torch

    index = torch.tensor(indices)
    return x[index].reshape(len(indices), 28, 28), y[index].argmax(dim=1).tolist()


@entry_point("predict")
def main(cfg: DictConfig, context: RunContext) -> None:
    predict(cfg, context.output_dir)


if __name__ == "__main__":
    main()
