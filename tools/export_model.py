#!/usr/bin/env python
"""Export a trained LesionRCNN or SemanticLesionNet for deployment, e.g.::

    python tools/export_model.py --config-file configs/maskrcnn_heimed.yaml \\
        --weights output/maskrcnn_heimed/model_final.pth --format torchscript --output export/

writes export/model.ts (or model.onnx with --format onnx), export/config.yaml and
export/export.json, only after the exported network has matched the eager model on the sample
images (--sample-image, repeatable). Use the folder from Python with
``retina_d2.export.ExportedLesionModel("export/")``. What is exported, what is refused and the
tolerance: retina_d2/export.py. Bad input is one ``error:`` line (exit 2).
"""
import logging
import sys

from retina_d2.export import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    sys.exit(main())
