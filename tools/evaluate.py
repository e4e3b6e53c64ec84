#!/usr/bin/env python
"""Instance AP (and FROC) of a COCO results file against a COCO GT file (``retina-d2 evaluate``).
The tool is retina_d2/tools/evaluate.py; --help says how."""
import sys

from retina_d2.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
