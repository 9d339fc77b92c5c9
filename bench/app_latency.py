"""Latency of the page's /classify API, and how soon `python -m src.app` serves the page.

    python bench/app_latency.py --ckpt outputs/.../checkpoints/last.ckpt [--digits ../shared/data/mnist-t10k]

Starts `python -m src.app` as a user would, times from process start until GET / answers,
then, after one untimed-in-the-figures first call per client (its connection set-up), sends
50 requests at once from 10 gradio_client clients (5 each, one thread per request) and reports
the median and 95th percentile of the client-to-answer time; then 20 calls one at a time.
Every answer is checked against the model's own answer computed in this process (ten
confidences summing to 1, the same top class).
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

        from gradio_client import Client, handle_file

        with tempfile.TemporaryDirectory() as folder:
            work = pictures(Path(folder), args.digits, args.requests)
            sys.path.insert(0, str(ROOT))
            from src.inference import load_model, read_image

            model = load_model(args.ckpt)  # the answer each request must get: the model's own, in this process
            expected = [model.classes[int(model.probabilities(read_image(path)[None])[0].argmax())] for path, _ in work]
            clients = [Client(url, verbose=False) for _ in range(args.clients)]
            first = []
            for client in clients:  # each client's first call (connection, first request) is timed apart
                t = time.perf_counter()
                client.predict(handle_file(work[0][0]), api_name="/classify")
                first.append(time.perf_counter() - t)

            def call(k: int) -> tuple[float, bool, bool]:
                path, label = work[k]
                t = time.perf_counter()
                result = clients[k % args.clients].predict(handle_file(path), api_name="/classify")
                elapsed = time.perf_counter() - t
                total = sum(c["confidence"] for c in result["confidences"])
                return elapsed, len(result["confidences"]) == 10 and abs(total - 1) < 1e-5 and (
                    result["label"] == expected[k]), label is not None and result["label"] == label

            wall = time.perf_counter()
            with ThreadPoolExecutor(args.requests) as pool:  # all requests at once, client k % 10 sending request k
                results = list(pool.map(call, range(args.requests)))
            wall = time.perf_counter() - wall
            alone = []
            for path, _ in work[:20]:
                t = time.perf_counter()
                clients[0].predict(handle_file(path), api_name="/classify")
                alone.append(time.perf_counter() - t)
    finally:
        server.terminate()
        server.wait(timeout=30)

    latencies = sorted(elapsed for elapsed, _, _ in results)
    same, right = sum(ok for _, ok, _ in results), sum(true for _, _, true in results)
    print(f"page served {served_s:.2f} s after process start")
    print(f"{len(results)} of {args.requests} requests answered, sent at once from {args.clients} clients, "
          f"all in {wall:.2f} s; {same} answers are the model's own (in this process), {right} the true class")
    print(f"latency, client to answer: median {statistics.median(latencies) * 1000:.0f} ms, "
          f"95th percentile {latencies[int(np.ceil(0.95 * len(latencies))) - 1] * 1000:.0f} ms")
    print(f"each client's first call (not counted above): median {statistics.median(first) * 1000:.0f} ms")
    # One call at a time, for the latency without queueing behind the others.
    print(f"one at a time: median {statistics.median(alone) * 1000:.0f} ms over {len(alone)} calls")

if __name__ == "__main__":
    main()
