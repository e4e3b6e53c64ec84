#!/usr/bin/env python
"""
Run a retina_d2 benchmark, e.g.::

    python tools/benchmark.py convert                 # HEI-MED conversion vs. floor and imantics
    python tools/benchmark.py convert --limit 2 --out /tmp/convert.json

An alias of ``python -m benchmarks`` run from the checkout root. The benchmarks are the
checkout's top-level ``benchmarks/`` package (one module each; not part of the installed
retina_d2, see benchmarks/__init__.py): this script runs ``python -m benchmarks`` in its place,
with the checkout on PYTHONPATH, so it works from any folder and edits no import path. Paths
given as arguments keep meaning what they mean where you run it. Results are written as JSON, by
default under ``benchmarks/results/``.
"""
import os
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    search = [str(CHECKOUT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in search if p))
    # Replaces this process: the exit status and Ctrl-C are the benchmark's own.
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]], env)
