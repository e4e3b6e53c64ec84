"""
The checkout's benchmarks, one module per subcommand::

    python tools/benchmark.py convert          # from any folder
    python -m benchmarks convert               # the same, from the checkout root

Why they are not in the ``retina_d2`` package: they measure this checkout, not an installed
toolkit. They read its ``configs/``, the HEI-MED sample beside it (``../shared``), write
``benchmarks/results/`` and run its ``tools/*.py`` in subprocesses, none of which a wheel has.
So the wheel ships ``retina_d2`` only (pyproject.toml), and this package imports ``retina_d2``
as any user code does.

How ``benchmarks`` is found without touching ``sys.path``: it is a top-level package of the
checkout, importable wherever the checkout root is on the import path. ``python -m`` puts the
current folder there; the tests get it from pytest's ``pythonpath`` (pyproject.toml);
``tools/benchmark.py`` runs ``python -m benchmarks`` with the checkout on ``PYTHONPATH``, as
:func:`measure_in_subprocess` does for every measured child. The editable install cannot carry
it: setuptools maps the same packages into the editable install and into the wheel.

A benchmark module defines ``add_arguments(parser)`` (its own flags) and ``run(args) -> dict``
(measures, writes its results file, returns the results). To add one, write the module and add
one line to :data:`BENCHMARKS`. Modules are imported only when their subcommand runs, so a heavy
import in one never slows another down.

Every variant that a benchmark compares should run in a fresh Python process
(:func:`measure_in_subprocess`), so that its peak memory is its own and not the maximum of every
variant that ran before it in the same interpreter.
"""
import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

# Before any benchmark module imports Detectron2 (here and in every measured child): retina_d2
# bridges Detectron2 0.6 to today's NumPy/Pillow and a missing detectron2._C (retina_d2/compat.py).
import retina_d2  # noqa: F401

__all__ = [
    "BENCHMARKS",
    "HEIMED_ROOT",
    "HEIMED_SPLIT",
    "REPO_ROOT",
    "build_parser",
    "convert_heimed_dev",
    "main",
    "measure_in_subprocess",
    "run_tool",
    "train_or_score",
]

# The checkout these benchmarks live in: default places of data beside it and of results in it.
REPO_ROOT = Path(__file__).resolve().parents[1]

# Subcommand -> (module in this package, one-line description).
BENCHMARKS: Dict[str, tuple] = {
    "convert": ("convert", "HEI-MED -> COCO conversion: time and peak memory beside the decode "
                "floor and a peer converter"),
    "infer": ("infer", "CPU forward latency and peak memory at 1024 px, and training "
              "iterations per second, beside Detectron2's stock mask_rcnn_R_50_FPN_3x"),
    "heimed-maskrcnn": ("heimed_maskrcnn", "Mask R-CNN trained on the HEI-MED dev split within a "
                        "CPU budget; exudate AP35/50/75 on its 10 val images"),
    "heimed-semantic": ("heimed_semantic", "the four semantic heads trained on the HEI-MED dev "
                        "split; exudate AUC-PR / F1, parameters, CPU latency and memory"),
    "heimed-localization": ("heimed_localization", "optic-nerve localization (MultiTaskLesionNet, "
                            "~10 CPU minutes) on the HEI-MED dev split; distance on 10 val images"),
    "heimed-exudate-cv": ("heimed_exudate_cv", "the CPU exudate recipe (dense map -> lesion "
                          "components) k-fold cross-validated on the HEI-MED dev images beside "
                          "the training-free floor"),
    "heimed-annotation": ("heimed_annotation", "HEI-MED's exudate annotations (filled squares, "
                          "their placement) and the IoU ceiling they set for bright-lesion "
                          "outlines"),
    "tiling": ("tiling", "tiled native-resolution inference vs whole-image: s/image, peak memory"),
    "tta": ("tta", "test-time augmentation off / flip / flip + quarter turns on the HEI-MED dev "
            "split: exudate AP35/50/75, FROC, s/image"),
    "gpu": ("gpu", "CUDA training and inference images/s with and without mixed precision, and "
            "tiled vs whole-image inference on the GPU"),
    "export": ("export", "CPU latency of the eager model beside its TorchScript and ONNX exports "
               "(and their largest differences from it)"),
    "pixel-ap": ("pixel_ap", "pixel average precision of a full-size lesion map: ours (exact and "
                 "binned) beside scikit-learn's average_precision_score"),
    "predict": ("predict", "tools/predict.py at archive scale: images/s with 1 and 2 processes "
                "on HEI-MED photographs, peak RSS for N and 10N inputs"),
}


def _import_benchmark(name: str):
    module, _ = BENCHMARKS[name]
    return importlib.import_module(f"{__name__}.{module}")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """
    The command-line parser. Only the chosen subcommand's module is imported to add its flags;
    the others appear in ``--help`` with their description.

    Args:
        argv: the arguments to be parsed (to find the chosen subcommand).

    Returns:
        argparse.ArgumentParser: a parser whose result carries ``benchmark`` (the subcommand).
    """
    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py",  # the documented command (python -m benchmarks is the same)
        description="retina_d2 benchmarks; each writes JSON results under benchmarks/results/.",
    )
    subparsers = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    chosen = next((a for a in argv if a in BENCHMARKS), None)
    for name, (_, description) in BENCHMARKS.items():
        sub = subparsers.add_parser(name, help=description, description=description)
        if name == chosen:
            _import_benchmark(name).add_arguments(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen benchmark. Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    _import_benchmark(args.benchmark).run(args)
    return 0


def _child_main() -> None:
    # Runs in the measured process: argv = [target, kwargs JSON, result path].
    target, kwargs_json, result_path = sys.argv[1:4]
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    # Peak RSS once the imports are done: what every variant pays before any work.
    import_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = function(**json.loads(kwargs_json))
    result["import_rss_mb"] = import_rss_kib / 1024
    with open(result_path, "w") as f:
        json.dump(result, f)


def measure_in_subprocess(
    target: str, kwargs: Dict[str, Any], timeout: Optional[float] = None
) -> Dict[str, Any]:
    """
    Run ``target(**kwargs)`` in a fresh Python process and measure its peak memory.

    Peak RSS comes from ``os.wait4`` on that one child: the kernel's ``ru_maxrss`` of the child
    (what ``getrusage(RUSAGE_CHILDREN)`` reports when it is the only child waited for), which
    counts numpy's and C libraries' allocations that ``tracemalloc`` cannot see.
    ``RUSAGE_CHILDREN`` itself is not read: it is the maximum over every child waited for so far,
    so a second variant would inherit the first one's peak.

    Args:
        target: ``"package.module:function"``; the function takes JSON-able keyword arguments,
            times its own work (imports excluded) and returns a JSON-able dict.
        kwargs: its keyword arguments.
        timeout: seconds before the child is killed; None waits for ever.

    Returns:
        dict: the function's result, plus ``peak_rss_mb`` (whole process), ``import_rss_mb``
            (peak after imports, before the work) and ``process_seconds`` (wall time of the
            process, imports included). On failure only ``error`` (the child's last output
            lines), ``peak_rss_mb`` and ``process_seconds``.
    """
    with tempfile.TemporaryDirectory(prefix="retina_d2_bench_") as tmp:
        result_path = Path(tmp) / "result.json"
        log_path = Path(tmp) / "child.log"
        command = [
            sys.executable, "-c", "from benchmarks import _child_main; _child_main()",
            target, json.dumps(kwargs), str(result_path),
        ]
        start = time.perf_counter()
        # The child must import this checkout's benchmarks and retina_d2 whatever its cwd and
        # install state.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p
        )
        with open(log_path, "wb") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        killer = threading.Timer(timeout, child.kill) if timeout else None
        if killer:
            killer.start()
        try:
            # wait4 rather than child.wait(): it returns the rusage of exactly this child.
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            if killer:
                killer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)
        measured = {
            "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
            "process_seconds": time.perf_counter() - start,
        }
        if child.returncode != 0 or not result_path.is_file():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            measured["error"] = f"exit status {child.returncode}: " + " | ".join(tail)
            return measured
        with open(result_path) as f:
            return {**json.load(f), **measured}


# The HEI-MED sample beside the checkout and its fixed 30 / 10 dev split, shared by the benchmarks
# that train on it.
HEIMED_ROOT = REPO_ROOT.parent / "shared" / "data" / "heimed"
HEIMED_SPLIT = REPO_ROOT / "configs" / "splits" / "heimed_dev.json"


def run_tool(script: str, *args: str, env: Optional[Dict[str, str]] = None) -> float:
    """Run ``tools/<script>`` of this checkout in a subprocess (its output streams through);
    return the seconds it took."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / script), *args], check=True, env=env)
    return time.perf_counter() - start


def train_or_score(config: Path, opts: Sequence[str], run_dir: Path, skip_train: bool,
                   env: Dict[str, str]) -> Optional[float]:
    """Train ``config`` with ``tools/train_net.py`` (``opts``: its overrides, OUTPUT_DIR among
    them) and return the seconds it took; with ``skip_train``, evaluate the final weights already
    in ``run_dir`` instead (``--eval-only``) and return None."""
    if skip_train:
        run_tool("train_net.py", "--config-file", str(config), "--eval-only",
                 "MODEL.WEIGHTS", str(run_dir / "model_final.pth"), *opts, env=env)
        return None
    return run_tool("train_net.py", "--config-file", str(config), *opts, env=env)


def convert_heimed_dev(root: Path, datasets: Path, semantic: bool = True) -> tuple:
    """Convert HEI-MED at ``root`` with the dev split into ``datasets/heimed``.

    Returns:
        (seconds, environment whose RETINA_D2_DATASETS registers the conversion for the tools)
    """
    from retina_d2.data.converters.base import require_dir

    root = require_dir(root.resolve(), "the HEI-MED folder")
    env = dict(os.environ, RETINA_D2_DATASETS=str(datasets))
    flags = [] if semantic else ["--no-semantic"]
    seconds = run_tool(
        "convert_dataset.py", "heimed", "--root", str(root), "--out", str(datasets / "heimed"),
        "--split-file", str(HEIMED_SPLIT), *flags, "--overwrite", env=env,
    )
    return seconds, env


def machine_info() -> Dict[str, Any]:
    """CPU count, load average, Python and platform: numbers from a shared box need these."""
    import platform

    return {
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def format_table(rows: List[Dict[str, Any]], columns: Sequence[tuple]) -> str:
    """
    A GitHub-style table of result rows.

    Args:
        rows: result dicts.
        columns: (header, key, format spec) triples; a missing or None value prints as "-".

    Returns:
        str: the table.
    """
    from tabulate import tabulate

    def cell(row, key, spec):
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    table = [[cell(row, key, spec) for _, key, spec in columns] for row in rows]
    return tabulate(table, headers=[header for header, _, _ in columns], tablefmt="github")
