"""Export a trained model for use without this program: `python -m src.export [ckpt_path=FILE] [format=onnx]`.

The checkpoint's network with its softmax becomes one file that needs nothing of this project:
an ONNX model (PyTorch's own exporter, checked with onnx.checker) or a TorchScript module. Input
`images`, float32 (batch, 784) in [0, 1] as the data module prepares them; output `probabilities`,
float32 (batch, 10); the dataset and the class names ride along as metadata. Before the file is
put in place the exported model runs on 1000 test images (onnxruntime, or torch.jit.load) and must
give the PyTorch model's probabilities within 1e-5 and the same class for every image.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from src.atomic import replaced_in_one_step, writing
from src.cli import entry_point
from src.config import ExportConfig, validated
from src.errors import UserError, one_line
from src.inference import LoadedModel, chosen_checkpoint, load_model
from src.run_context import RunContext

if TYPE_CHECKING:  # torch itself is imported where it is used: bad input is refused before that (seconds)
    import torch

    from src.network import Probabilities

PARITY_IMAGES = 1000  # test images the exported model must agree on
TOLERANCE = 1e-5  # largest absolute difference allowed between exported and PyTorch probabilities
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}
INPUT_NOTE = ("float32 (batch, 784): 28x28 pixels row by row in [0, 1], a light digit on a dark ground "
              "(0 = ground), centred as MNIST's digits")


def export(cfg: DictConfig) -> Path:
    """Write the configured checkpoint's model in the configured format, checked; return its path."""
    config: ExportConfig = validated(cfg)
    if config.format == "onnx":  # TorchScript is part of PyTorch and needs no extra
        from src.extras import require

        require("export", "format=onnx", "onnx", "onnxruntime", "onnxscript")
    ckpt_path, source = chosen_checkpoint(config.ckpt_path)
    model = load_model(ckpt_path)
    from src.network import Probabilities

    target = Path(config.out) if config.out is not None else ckpt_path.parent / FILE_NAMES[config.format]
    what = f"out={config.out!r}" if config.out is not None else f"{target} (the default, beside the checkpoint)"
    if target.resolve() == ckpt_path.resolve():
        raise UserError(f"{what} is the checkpoint itself: give another file to write the model to")
    with writing(target), _written_in_one_step(target, what, FILE_NAMES[config.format]) as partial:
        print(f"checkpoint: {ckpt_path} ({source}; {model.summary})")
        images, described = _parity_images(model, config)
        wrapped = Probabilities(model.net).eval()
        if config.format == "onnx":
            summary = _write_onnx(wrapped, model, partial)
            exported = _run_onnx(partial, images)
        else:
            summary = _write_torchscript(wrapped, model, partial)
            exported = _run_torchscript(partial, images)
        _check_parity(exported, model.probabilities(images), described, config.format)
    print(f"exported: {target} ({summary}, {target.stat().st_size / 1e6:.1f} MB)")
    return target


@contextlib.contextmanager
def _written_in_one_step(target: Path, what: str, example_name: str):
    """A temporary file beside `target`, renamed onto it if the block succeeds and deleted if not,
    so that a failed or interrupted export leaves no half-written model (and keeps an older one)."""
    if target.is_dir():
        raise UserError(f"{what} is a folder: give the path of the file to write, e.g. out={target / example_name}")
    with contextlib.ExitStack() as stack:
        try:
            partial = stack.enter_context(replaced_in_one_step(target, suffix=".partial"))
        except OSError as error:
            reason = (f"the folder {target.parent} does not exist" if isinstance(error, FileNotFoundError) else
                      f"{target.parent} is not a folder" if isinstance(error, NotADirectoryError) else
                      f"{target.parent} is not writable ({error.strerror})")
            hint = "" if what.startswith("out=") else "; give out=FILE"
            raise UserError(f"{what} cannot be written: {reason}{hint}") from None
        yield partial


def _parity_images(model: LoadedModel, config: ExportConfig) -> tuple[torch.Tensor, str]:
    """The first 1000 images of the checkpoint's test split, prepared as in training, when its files
    are on this machine; else 1000 random images in [0, 1], which still compare the two models."""
    from src.idx import DATASET_CLASSES, files_here, load_split, prepare_files

    name = model.dataset
    data_dir = Path(config.data_dir or model.data.get("data_dir") or "data")
    # Only files already here: prepare_files would otherwise try to download a whole dataset for a check.
    found = name in DATASET_CLASSES and files_here(name, data_dir)
    if found:
        x, _ = load_split(name, str(prepare_files(name, data_dir)), train=False)
        return x[:PARITY_IMAGES], f"the first {min(len(x), PARITY_IMAGES)} {name} test images (from {data_dir}/)"
    if config.data_dir is not None:
        expected = f"the {name} test split" if name in DATASET_CLASSES else "a dataset"
        raise UserError(f"data_dir={config.data_dir!r} does not hold {expected}: the checkpoint was trained on "
                        f"{name or 'unknown data'}; leave data_dir out to check on random images")
    import torch

    images = torch.rand(PARITY_IMAGES, 28 * 28, generator=torch.Generator().manual_seed(0))
    why = (f"no {name} files in {data_dir}/: give data_dir=DIR to check on the test split" if name in DATASET_CLASSES
           else "the checkpoint does not record its dataset")
    return images, f"{PARITY_IMAGES} random images in [0, 1] ({why})"


def _metadata(model: LoadedModel) -> dict[str, str]:
    return {"dataset": model.dataset or "unknown", "classes": json.dumps(model.classes),
            "images": INPUT_NOTE, "probabilities": f"float32 (batch, {len(model.classes)}): softmax over the classes"}


def _write_onnx(wrapped: Probabilities, model: LoadedModel, path: Path) -> str:
    import onnx
    import torch

    example = torch.rand(2, 28 * 28)  # 2, not 1: torch.export would take a size of 1 for a constant
    # PyTorch's default (dynamo) exporter; the TorchScript-based one is deprecated since 2.9.
    program = torch.onnx.export(wrapped, (example,), dynamo=True, input_names=["images"],
                                output_names=["probabilities"], dynamic_shapes={"images": {0: "batch"}},
                                verbose=False)
    proto = program.model_proto
    proto.doc_string = f"{model.dataset or 'an MNIST-like'} classifier: softmax probabilities of 28x28 images"
    for key, value in _metadata(model).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)  # also infers and checks every shape
    onnx.save(proto, path)
    return (f"ONNX opset {proto.opset_import[0].version}, {_signature(proto.graph.input[0])} -> "
            f"{_signature(proto.graph.output[0])}, onnx.checker passed")


def _signature(value) -> str:
    """'images float32 (batch, 784)', read from the model itself."""
    import onnx

    dims = [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]
    return f"{value.name} {onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)} ({', '.join(dims)})"


def _run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [probabilities] = session.run(["probabilities"], {"images": images.numpy()})
    return torch.from_numpy(probabilities)


def _write_torchscript(wrapped: Probabilities, model: LoadedModel, path: Path) -> str:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PyTorch marks TorchScript deprecated; docs/export.md says so
        scripted = torch.jit.script(wrapped)  # scripted, not traced: no shape is fixed by an example
        # Through a Python file, whose full disk is an OSError: saved to a path, it aborts the process from C++.
        with open(path, "wb") as f:
            torch.jit.save(scripted, f, _extra_files=_metadata(model))
    return "TorchScript, scripted: images (batch, 784) -> probabilities (batch, 10)"


def _run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return loaded(images)


def _check_parity(exported: torch.Tensor, expected: torch.Tensor, described: str, fmt: str) -> None:
    runtime = "onnxruntime" if fmt == "onnx" else "torch.jit.load"
    if exported.shape != expected.shape:
        raise UserError(f"the exported model gives {runtime} probabilities of shape {tuple(exported.shape)}, "
                        f"PyTorch {tuple(expected.shape)}, so nothing was written")
    difference = float((exported - expected).abs().max())
    same = int((exported.argmax(dim=1) == expected.argmax(dim=1)).sum())
    line = (f"parity on {described}: max |{runtime} - PyTorch| = {difference:.1e} (limit {TOLERANCE:.0e}), "
            f"same class for {same}/{len(expected)}")
    if not difference <= TOLERANCE or same != len(expected):  # `not <=`: a NaN fails too
        raise UserError(f"the exported model disagrees with PyTorch, so nothing was written: {one_line(line)}")
    print(line)


@entry_point("export")
def main(cfg: DictConfig, context: RunContext) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
