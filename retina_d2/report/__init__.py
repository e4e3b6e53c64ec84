"""A visual evaluation report a clinician can read: one HTML page (Jinja2 templates in
``templates/``) with the model scored, the metric tables of every evaluator that ran, PR and FROC
curves per lesion, and the worst and best images with lesions and the healthy eyes with false
alarms, hits, misses and false alarms outlined, each linked to its full-resolution view
(``tools/report.py``, ``retina-d2 report``)."""
from .build import EVAL_INFO, REPORT_DIR, REPORT_MARKER, ReportError, build_report

__all__ = ["EVAL_INFO", "REPORT_DIR", "REPORT_MARKER", "ReportError", "build_report"]
