"""Keras's chapter-2 MNIST classifier as a PyTorch Lightning + Hydra program."""

import atexit
import gc
import os
import sys

if sys.argv[:1] == ["-m"]:  # `python -m src.X` is starting: Python sets argv[0] so while it finds the module
    # A process that imports torch, Lightning and Hydra (millions of objects), runs one job and ends. The
    # garbage collector's full walks over those objects, while importing and at exit, found next to nothing
    # and took about 1.3 s of a 5-epoch run (bench/speed.py --mode process): collect young objects ten times
    # less often, and leave the memory at exit to the system (atexit's handlers, which close files and
    # flush logs, still run first).
    gc.set_threshold(7000, 10, 10)  # Python's default: (700, 10, 10)
    atexit.register(gc.freeze)
    # torch's threads (libgomp's OpenMP team) wait for each other after every small operation, spinning up to
    # 300,000 times first. Beside other busy processes the thread waited for is often not running, and the
    # spinning one burns its share for nothing: 2 epochs of Fashion-MNIST beside two busy loops took 21-38 s
    # (30 s of CPU on average); spinning 1,000 times, as libgomp itself does when its threads outnumber the
    # cores, 12.7-13.3 s (10 s of CPU). Alone, 7.6-9.5 s against 6.7-8.9 s (docs/performance.md). A value
    # of the user's stands.
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
