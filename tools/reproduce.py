#!/usr/bin/env python
"""Reproduce a paper's system with one command (``retina-d2 reproduce``): convert, train, select
on validation, score the test split, and set ours beside the published figures. The tool is
retina_d2/tools/reproduce.py; --help says how."""
import sys

from retina_d2.tools.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
