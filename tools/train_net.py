#!/usr/bin/env python
"""Train and evaluate a retina_d2 model with Detectron2's DefaultTrainer (``retina-d2 train``).
The tool is retina_d2/tools/train_net.py; --help says how."""
from retina_d2.tools.train_net import build_parser, cli, main  # noqa: F401  (the tool's API)

if __name__ == "__main__":
    cli()
