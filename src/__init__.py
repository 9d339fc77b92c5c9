"""Keras's chapter-2 MNIST classifier as a PyTorch Lightning + Hydra program."""

import atexit
import gc
import sys

if sys.argv[:1] == ["-m"]:  # `python -m src.X` is starting: Python sets argv[0] so while it finds the module
    # A process that imports torch, Lightning and Hydra (millions of objects), runs one job and ends. The
    # garbage collector's full walks over those objects, while importing and at exit, found next to nothing
    # and took about 1.3 s of a 5-epoch run (bench/speed.py --mode process): collect young objects ten times
    # less often, and leave the memory at exit to the system (atexit's handlers, which close files and
    # flush logs, still run first).
    gc.set_threshold(7000, 10, 10)  # Python's default: (700, 10, 10)
    atexit.register(gc.freeze)
