#!/usr/bin/env python
"""
Run a retina_d2 benchmark, e.g.::

    python tools/benchmark.py convert                 # HEI-MED conversion vs. floor and imantics
    python tools/benchmark.py convert --limit 2 --out /tmp/convert.json

Subcommands and their flags live in ``retina_d2/benchmarks/`` (one module each); results are
written as JSON, by default under ``benchmarks/results/``.
"""
import logging
import sys

from retina_d2.benchmarks import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(main())
