"""Latency of the page's /classify API, and how soon `python -m src.app` serves the page.

    python bench/app_latency.py --ckpt outputs/.../checkpoints/last.ckpt [--digits ../shared/data/mnist-t10k]

Starts `python -m src.app` as a user would and times from process start until GET / answers.
Then /classify is called three ways, each first one call per client untimed (connection
set-up), then 20 calls one at a time, then 50 requests at once from 10 clients (5 each, one
thread per request), with the median and 95th percentile of the client-to-answer time:

- gradio_client as documented, `Client(url).predict(handle_file(path), api_name="/classify")`;
- the same with `Client(url, ssl_verify=False)`: over plain http there is no certificate to
  verify, and it spares httpx loading the CA bundle for each of the three connections a call
  opens (the upload, the queue join, the event stream);
- plain HTTP on one kept-alive connection per client: the upload, then Gradio's direct route
  POST /gradio_api/run/classify, which runs the function without the queue and its stream.

gradio_client joins Gradio's queue and reads the answer from an event stream whatever the
event's queue setting, and its waiting thread looks for the answer every 50 ms
(gradio_client/utils.py, stream_sse_v1plus), so a call through it takes at least that.
Every answer is checked against the model's own answer computed in this process (ten
confidences summing to 1, the same top class). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import gzip
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pictures(folder: Path, digits: Path | None, n: int) -> list[tuple[Path, str | None]]:
    """n PNG pictures and their true classes: real held-out MNIST digits, or drawn bars when none are given."""
    if digits and (digits / "t10k-images-idx3-ubyte.gz").is_file():
        with gzip.open(digits / "t10k-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)[-n:]
        with gzip.open(digits / "t10k-labels-idx1-ubyte.gz") as f:
            labels = [str(k) for k in np.frombuffer(f.read()[8:], np.uint8)[-n:]]
    else:
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 6:22, 12:16] = 255
        labels = [None] * n
    paths = []
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{k}.png")
        paths.append(folder / f"{k}.png")
    return list(zip(paths, labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint to serve")
    parser.add_argument("--digits", type=Path, default=ROOT.parent / "shared" / "data" / "mnist-t10k",
                        help="folder with MNIST's t10k IDX files; the last 50 digits are sent")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()

    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # gradio_client too would report each client to Gradio
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "src.app", f"ckpt_path={args.ckpt}", f"port={port}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if server.poll() is not None:
                sys.exit(f"error: the server stopped: {server.stderr.read().strip()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as page:
                    assert page.status == 200 and b"<html" in page.read().lower()
                break
            except OSError:
                time.sleep(0.05)
        served_s = time.perf_counter() - start

        with tempfile.TemporaryDirectory() as folder:
            work = pictures(Path(folder), args.digits, args.requests)
            sys.path.insert(0, str(ROOT))
            from src.inference import load_model
            from src.pictures import read_image

            model = load_model(args.ckpt)  # the answer each request must get: the model's own, in this process
            expected = [model.classes[int(model.probabilities(read_image(path)[None])[0].argmax())] for path, _ in work]
            print(f"page served {served_s:.2f} s after process start; load average {load()}")
            for name, connect in callers(url):
                measure(name, connect, work, expected, args)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"load average after: {load()}")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def callers(url: str):
    """(name, a function making one client) for each way of calling /classify; a client is `call(path) -> answer`."""
    import httpx
    from gradio_client import Client, handle_file

    def through_gradio_client(**options):
        def connect():
            client = Client(url, verbose=False, **options)
            return lambda path: client.predict(handle_file(path), api_name="/classify")
        return connect

    def plain_http():
        http = httpx.Client(base_url=url, timeout=60)

        def call(path: Path) -> dict:
            with path.open("rb") as f:
                upload = http.post("gradio_api/upload", files={"files": (path.name, f, "image/png")})
            upload.raise_for_status()
            picture = {"path": upload.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
            answer = http.post("gradio_api/run/classify", json={"data": [picture]})
            answer.raise_for_status()
            return answer.json()["data"][0]
        return call

    yield "gradio_client, Client(url)", through_gradio_client()
    yield "gradio_client, Client(url, ssl_verify=False)", through_gradio_client(ssl_verify=False)
    yield "plain HTTP, upload + POST /gradio_api/run/classify", plain_http


def measure(name: str, connect, work: list, expected: list[str], args) -> None:
    clients = [connect() for _ in range(args.clients)]
    for client in clients:  # each client's first call (connection, first request) is not counted
        client(work[0][0])

    def call(k: int) -> tuple[float, bool, bool]:
        path, label = work[k]
        t = time.perf_counter()
        result = clients[k % args.clients](path)
        elapsed = time.perf_counter() - t
        total = sum(c["confidence"] for c in result["confidences"])
        return elapsed, len(result["confidences"]) == 10 and abs(total - 1) < 1e-5 and (
            result["label"] == expected[k]), label is not None and result["label"] == label

    alone = [call(k)[0] for k in range(20)]  # one at a time: the latency without queueing behind the others
    wall = time.perf_counter()
    with ThreadPoolExecutor(args.requests) as pool:  # all requests at once, client k % 10 sending request k
        results = list(pool.map(call, range(args.requests)))
    wall = time.perf_counter() - wall
    latencies = sorted(elapsed for elapsed, _, _ in results)
    same, right = sum(ok for _, ok, _ in results), sum(true for _, _, true in results)
    print(f"{name}:\n  one at a time: median {ms(statistics.median(alone))}, "
          f"95th percentile {ms(percentile(sorted(alone), 0.95))} over {len(alone)} calls")
    print(f"  {len(results)} of {args.requests} sent at once from {args.clients} clients answered in {wall:.2f} s, "
          f"{same} the model's own answer, {right} the true class; median {ms(statistics.median(latencies))}, "
          f"95th percentile {ms(percentile(latencies, 0.95))}; load average {load()}")


def percentile(ordered: list[float], q: float) -> float:
    return ordered[int(np.ceil(q * len(ordered))) - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


if __name__ == "__main__":
    main()
