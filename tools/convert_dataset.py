#!/usr/bin/env python
"""Convert a public DR lesion dataset's native masks into per-instance COCO JSON
(``retina-d2 convert``). The tool is retina_d2/tools/convert_dataset.py; --help says how."""
import sys

from retina_d2.tools.convert_dataset import main

if __name__ == "__main__":
    sys.exit(main())
