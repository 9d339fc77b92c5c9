"""The page: `python -m src.app [ckpt_path=FILE] [host=127.0.0.1] [port=7860]`.

Draw a digit on a sketchpad, or upload a picture of one, and see the model's ten
probabilities and the 28x28 image it saw. One Gradio API endpoint, /classify, takes a
picture and returns the label with its ten confidences. The server holds one model, loaded
through src/inference.py as predict loads it; Lightning is never imported, and nothing is
fetched from or sent to the internet.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from src.cli import entry_point
from src.config import AppConfig, validated
from src.errors import UserError
from src.inference import LoadedModel, chosen_checkpoint, load_model
from src.pictures import open_picture, prepare_picture
from src.run_context import RunContext

CANVAS = 280  # sketchpad pixels a side: ten for each of MNIST's 28
BRUSH = 12  # brush radius in canvas pixels: a stroke about a tenth of the square, as thick as MNIST's pen
MIN_DRAWING = CANVAS // 5  # a drawing spanning fewer pixels than this is a dot or a slip, not a digit
SEEN = 10  # the 28x28 image is shown with each pixel as a 10x10 block, sharp, not smoothed
MAX_UPLOAD = "10mb"  # Gradio refuses larger uploads before they reach the server's disk


def offline() -> None:
    """No analytics and no version check (Gradio reads this when imported); localhost never through a proxy."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    local = [h for h in os.environ.get("NO_PROXY", os.environ.get("no_proxy", "")).split(",") if h]
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(dict.fromkeys([*local, "127.0.0.1", "localhost"]))


def classify_picture(model: LoadedModel, picture, what: str) -> tuple[dict[str, float], np.ndarray]:
    """A picture (array or Pillow image) -> ({class name: probability}, the 28x28 image the model saw, enlarged)."""
    digit = prepare_picture(picture, what)
    probabilities = model.probabilities(digit[None])[0].tolist()
    seen = (digit.numpy() * 255).round().astype(np.uint8)
    return dict(zip(model.classes, probabilities)), np.kron(seen, np.ones((SEEN, SEEN), np.uint8))


def sketch_ink(editor: dict | None) -> np.ndarray | None:
    """The strokes of a Sketchpad value as light ink on a dark ground, (H, W) uint8; None when nothing is drawn.

    Read from the layers' alpha channel: the canvas behind them is white in the light theme and
    dark grey in the dark one, so the composite's colours depend on the theme, the alpha does not.
    """
    layers = [layer for layer in (editor or {}).get("layers") or [] if layer is not None]
    alphas = [np.asarray(layer)[:, :, 3] for layer in layers if np.ndim(layer) == 3 and np.shape(layer)[2] == 4]
    if not alphas:
        return None
    ink = np.maximum.reduce(alphas)
    return ink if ink.any() else None


def read_sketch(model: LoadedModel, editor: dict | None):
    """The page's sketchpad -> (probabilities or a short message, the image seen); nothing for an empty canvas."""
    ink = sketch_ink(editor)
    if ink is None:
        return None, None
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 < MIN_DRAWING:
        return "Too small to read: draw the digit larger", None
    try:
        return classify_picture(model, ink, "the drawing")
    except UserError as error:
        return str(error), None


def read_upload(model: LoadedModel, upload: dict | None):
    """The page's upload tab (Gradio's file record, not yet opened) -> (probabilities or a short message, image seen)."""
    if not upload:
        return None, None
    try:
        return classify_picture(model, *_open_upload(upload))
    except UserError as error:
        return str(error), None


def classify(model: LoadedModel, upload: dict | None) -> dict[str, float]:
    """The /classify endpoint: a picture -> {class name: probability}; bad input is an error for the caller."""
    import gradio as gr

    if not upload:
        raise gr.Error("no picture given: send one image file", print_exception=False)
    try:
        return classify_picture(model, *_open_upload(upload))[0]
    except UserError as error:
        raise gr.Error(str(error), print_exception=False) from None


def _open_upload(upload: dict):
    """Opened by the same code as `python -m src.predict image=...`, named by the name it was sent under."""
    what = repr(upload.get("orig_name") or Path(upload["path"]).name)
    return open_picture(upload["path"], what), what


def blank_paper() -> dict:
    """The sketchpad's value on load and after "Clear canvas": white paper and one empty layer to draw on.

    Gradio's editor opens on its image tool ("select the draw tool to start") whenever its value is empty,
    even with no image sources (Gradio 6.31, ImageEditor.svelte), and with the brush when it is given a
    background; the empty layer makes loading it count as the editor's first change, which the editor
    otherwise swallows from the first stroke instead (Index.svelte, has_run_change).
    """
    return {"background": np.full((CANVAS, CANVAS, 4), 255, np.uint8),
            "layers": [np.zeros((CANVAS, CANVAS, 4), np.uint8)], "composite": None}


def build_page(model: LoadedModel, served: str):
    """The Gradio page for one loaded model; `served` says which checkpoint, in one line."""
    import gradio as gr

    classes = "digits" if model.classes == [str(k) for k in range(10)] else ", ".join(model.classes)
    with gr.Blocks(title="Draw a digit", analytics_enabled=False) as page:
        gr.Markdown(f"### Draw a digit, or upload a picture of one\nServing {served}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                with gr.Tab("Draw"):  # the brush, eraser, undo and "Clear canvas" are the sketchpad's own
                    sketch = gr.Sketchpad(
                        canvas_size=(CANVAS, CANVAS), fixed_canvas=True, height=CANVAS + 160, image_mode="RGBA",
                        type="numpy", brush=gr.Brush(colors=["#000000"], color_mode="fixed", default_size=BRUSH),
                        layers=False, transforms=(), label="Sketchpad", show_label=False, elem_id="sketchpad",
                        value=blank_paper())
                with gr.Tab("Upload"):
                    upload = gr.Image(type="filepath", label="A picture of one digit", sources=["upload", "clipboard"],
                                      elem_id="upload")
            with gr.Column(scale=1):
                probabilities = gr.Label(num_top_classes=len(model.classes), label=f"Probabilities ({classes})",
                                         elem_id="probabilities")
                seen = gr.Image(label="What the model saw (28x28)", interactive=False, height=CANVAS,
                                buttons=[], elem_id="seen")

        # The page's own events are private: they exist for the page, the API is /classify below.
        # "Clear canvas" leaves the editor on its image tool; a new background puts it back on the brush.
        sketch.clear(blank_paper, None, sketch, show_progress="hidden", api_visibility="private")
        sketch.change(lambda editor: read_sketch(model, editor), sketch, [probabilities, seen],
                      trigger_mode="always_last", show_progress="hidden", api_visibility="private")
        # preprocess=False: the function gets Gradio's record of the uploaded file and opens it as predict does,
        # so that a file that is not an image gets a message rather than Gradio's failure to open it.
        upload.change(lambda record: read_upload(model, record), upload, [probabilities, seen], preprocess=False,
                      api_visibility="private")

        # /classify: one picture in, the label and its ten confidences out. Its components are never shown;
        # an event with no trigger is callable only through the API (gradio_client, HTTP). The queue stays on:
        # gradio_client joins it and reads an event stream whatever queue= says (client.py, make_predict), and
        # Gradio's direct route, POST /gradio_api/run/classify, already runs it without the queue for plain HTTP.
        api_picture, api_label = gr.Image(type="filepath", visible=False), gr.Label(visible=False)
        gr.on([], lambda record: classify(model, record), api_picture, api_label, api_name="classify",
              preprocess=False, concurrency_limit=None)
    return page


def serve(cfg: DictConfig, block: bool = True):
    """Load the model, print what is served and where, and serve the page until Ctrl-C (or return it, block=False)."""
    config: AppConfig = validated(cfg)
    from src.extras import require

    require("app", "python -m src.app", "gradio")
    ckpt_path, source = chosen_checkpoint(config.ckpt_path)
    model = load_model(ckpt_path)
    print(f"checkpoint: {ckpt_path} ({source}; {model.summary})")

    offline()
    page = build_page(model, f"`{ckpt_path}` ({model.summary})")
    try:
        page.launch(server_name=config.host, server_port=config.port, share=False, ssr_mode=False, quiet=True,
                    max_file_size=MAX_UPLOAD, prevent_thread_lock=True, show_error=True)
    except OSError as error:  # Gradio: "Cannot find empty port in range: 7860-7860."
        raise UserError(f"port={config.port} cannot be used on host={config.host!r} ({error}); "
                        "choose another with port=N") from None
    url = f"http://{'127.0.0.1' if config.host == '0.0.0.0' else config.host}:{page.server_port}"
    print(f"serving on {url} (Ctrl-C stops)", flush=True)
    if block:
        page.block_thread()
    return page


@entry_point("app")
def main(cfg: DictConfig, context: RunContext) -> None:
    serve(cfg)


if __name__ == "__main__":
    offline()  # before anything imports gradio
    main()
