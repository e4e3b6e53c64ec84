#!/usr/bin/env python
"""Predict lesions on images of any size: COCO results, overlays, counts (``retina-d2 predict``).
The tool is retina_d2/tools/predict.py; --help says how."""
import sys

from retina_d2.tools.predict import main

if __name__ == "__main__":
    sys.exit(main())
