#!/usr/bin/env python
"""Write the HTML evaluation report of an evaluation folder (``retina-d2 report``).
The tool is retina_d2/tools/report.py; --help says how."""
import sys

from retina_d2.tools.report import main

if __name__ == "__main__":
    sys.exit(main())
