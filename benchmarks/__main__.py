"""``python -m benchmarks <name> [flags]`` from the checkout root: run one benchmark
(``tools/benchmark.py`` runs this from any folder)."""
import logging
import sys

from benchmarks import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(main())
