"""Prediction at archive scale: inputs sharded over processes and machines, results streamed to
disk, interrupted runs resumed.

A screening programme's archive holds millions of photographs: more than one process should
predict, a results list should not grow in memory, and a run stopped half-way (a killed job, a
reboot) should not start again from the first image. ``tools/predict.py`` therefore:

1. starts its processes with Detectron2's ``launch`` (:func:`run_on_every_rank`; the
   ``--num-gpus`` / ``--num-machines`` / ``--machine-rank`` / ``--dist-url`` of training, N CPU
   processes with gloo where there is no CUDA). Process ``rank`` of ``world`` predicts every
   ``world``-th image still to do (:func:`share`), in input order;
2. has each process append one JSON line per image to its own part,
   ``OUTPUT/parts/rank<rank>.jsonl`` (:class:`PartWriter`), flushed after every image, once the
   image's overlay and maps are in place; the line is what marks the image done;
3. merges the parts into the COCO results file, the lesion counts and the image-level outputs at
   the end (:func:`merge_parts`), in input order, reading one line at a time, so the outputs are
   the same whatever the number of processes and memory stays flat;
4. with ``--resume``, skips the images whose lines are complete in any part (:func:`start_parts`),
   whichever number of processes wrote them. A last line cut short by a kill is not complete: it
   is dropped, and its image predicted again.

A run's settings (model file, config, thresholds, overlay options) are kept in
``OUTPUT/parts/run.json``; ``--resume`` refuses to mix in predictions made with other ones. Lines
are flushed to the operating system, not synced to the disk: a killed process loses nothing
written, a power cut may lose the last images (which ``--resume`` then predicts again). Several
machines must share ``--output`` (a network file system): the merge reads every part.
"""
import argparse
import contextlib
import csv
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from detectron2.utils import comm

from ..data.converters.base import atomic_write, remove_interrupted_writes
from ..schema import COCO_RESULTS_FILE, OVERLAYS_DIR

__all__ = [
    "PARTS_DIR",
    "RUN_FILE",
    "MergeSummary",
    "PartError",
    "PartWriter",
    "add_arguments",
    "check_arguments",
    "complete_lines",
    "merge_parts",
    "part_file",
    "predicted",
    "run_on_every_rank",
    "run_settings",
    "share",
    "start_parts",
    "world_size",
]

# Under --output: the per-process parts and the run's settings.
PARTS_DIR = "parts"
RUN_FILE = "run.json"
_PART_NAME = re.compile(r"rank(\d+)\.jsonl")

# A part line starts '{"file": "<path>", "image_id": <int>, ': scanning an archive's parts for
# what is done reads these keys without decoding every line's masks.
_FILE_PREFIX = '{"file": '
_IMAGE_ID = re.compile(r', "image_id": (-?\d+)[,}]')
_DECODER = json.JSONDecoder()


class PartError(ValueError):
    """A part or run file that cannot be resumed from or merged (one line, naming it)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Detectron2's launch flags (as training's) and --resume."""
    group = parser.add_argument_group("archive scale (retina_d2/engine/predict_shards.py)")
    group.add_argument(
        "--num-gpus", type=int, default=1,
        help="processes per machine, each predicting its share of the images (one GPU each; "
        "without CUDA, N CPU processes)",
    )
    group.add_argument("--num-machines", type=int, default=1, help="machines sharing the run")
    group.add_argument(
        "--machine-rank", type=int, default=0,
        help="this machine's rank (0 to --num-machines - 1); machine 0 writes the merged results",
    )
    group.add_argument(
        "--dist-url", default="auto",
        help="where the processes meet (tcp://HOST:PORT of machine 0; 'auto': a free port, one "
        "machine only)",
    )
    group.add_argument(
        "--resume", action="store_true",
        help=f"continue a run stopped part-way into the same --output: the images whose lines "
        f"are complete in OUTPUT/{PARTS_DIR}/rank<k>.jsonl are skipped (a line cut short is "
        "dropped and its image predicted again); refused if the run's settings differ",
    )


def check_arguments(args) -> None:
    """The launch flags' values; a ValueError naming the flag otherwise."""
    if args.num_gpus < 1:
        raise ValueError(f"--num-gpus {args.num_gpus}: give 1 or more processes per machine")
    if args.num_machines < 1:
        raise ValueError(f"--num-machines {args.num_machines}: give 1 or more machines")
    if not 0 <= args.machine_rank < args.num_machines:
        raise ValueError(
            f"--machine-rank {args.machine_rank}: must be 0 to {args.num_machines - 1}"
        )
    if args.num_machines > 1 and args.dist_url == "auto":
        raise ValueError("--dist-url auto works on one machine only: give tcp://HOST:PORT")


def world_size(args) -> int:
    return args.num_gpus * args.num_machines


def share(todo: Sequence, rank: int, world: int) -> list:
    """Process ``rank``'s images: every ``world``-th of ``todo`` from its ``rank``-th, in order
    (round robin: the shares differ by one image at most, whatever the images' order)."""
    return list(todo[rank::world])


def part_file(output: Path, rank: int) -> Path:
    return Path(output) / PARTS_DIR / f"rank{rank}.jsonl"


def run_settings(cfg, weights: str, **options) -> Dict[str, Any]:
    """What a resumed run must share with the run it continues: the model file (path, size and
    modification time), its config (but MODEL.DEVICE: a run started on the CPU may go on on a
    GPU) and ``options`` (JSON values: thresholds, overlay options)."""
    stat = os.stat(weights)
    config = cfg.clone()
    config.defrost()
    config.MODEL.DEVICE = ""
    return json.loads(json.dumps({
        "weights": {"path": str(weights), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns},
        "config": config.dump(),
        **options,
    }))


def _part_files(parts: Path) -> List[Path]:
    """The parts under ``parts``, by rank."""
    found = [p for p in parts.iterdir() if _PART_NAME.fullmatch(p.name)] if parts.is_dir() else []
    return sorted(found, key=lambda p: int(_PART_NAME.fullmatch(p.name).group(1)))


def complete_lines(path: Path) -> Iterator[Tuple[int, bytes]]:
    """(byte offset, line) of each complete line of a part; a last line without its newline was
    cut short by a kill and is left out."""
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            if not line.endswith(b"\n"):
                return
            yield offset, line
            offset += len(line)


def _record_key(path: Path, number: int, line: bytes) -> Tuple[str, Any]:
    """(file, image_id) of a part line."""
    try:
        text = line.decode("ascii")  # json.dumps escapes everything else
        if text.startswith(_FILE_PREFIX):
            file, end = _DECODER.raw_decode(text, len(_FILE_PREFIX))
            found = _IMAGE_ID.match(text, end)
            if isinstance(file, str) and found:
                return file, int(found.group(1))
        record = json.loads(text)
        return record["file"], record["image_id"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise PartError(
            f"{path}: line {number} is not a prediction record ({type(e).__name__}: {e}); "
            "parts are written by predict only"
        ) from e


def predicted(output: Path, ids: Optional[Dict[Path, Any]] = None) -> Dict[str, Tuple[Path, int]]:
    """Every image whose line is complete in a part under ``output``: file -> (part, offset).

    Args:
        ids: this run's image ids; a line giving another id to one of its images is a
            PartError (the inputs or --gt changed since: its results would carry the wrong id).
    """
    wanted = {str(p): i for p, i in ids.items()} if ids is not None else {}
    found = {}
    for part in _part_files(Path(output) / PARTS_DIR):
        for number, (offset, line) in enumerate(complete_lines(part), 1):
            file, image_id = _record_key(part, number, line)
            if file in wanted and wanted[file] != image_id:
                raise PartError(
                    f"{part}: line {number} gives {file} the image id {image_id}, this run "
                    f"gives it {wanted[file]} (the inputs or --gt changed): predict into a new "
                    "--output"
                )
            found.setdefault(file, (part, offset))
    return found


def start_parts(output: Path, settings: Dict[str, Any], resume: bool, images: Sequence[Path],
                ids: Dict[Path, Any], machine_rank: int = 0) -> Tuple[List[Path], int]:
    """Prepare ``OUTPUT/parts`` before the processes start, and list the images to predict.

    Machine 0 records ``settings`` in run.json; without ``resume`` it first removes the parts
    and run.json of an earlier run (predict's own files: nothing else there is touched). With
    ``resume``, the images already predicted are left out (every machine reads the parts before
    any of its processes writes: they all meet in ``launch`` first).

    Returns:
        (the images still to predict, in input order; how many of ``images`` were done)

    Raises:
        PartError: with ``resume``, parts written with other settings or other image ids.
        OSError: the folder cannot be written.
    """
    parts = Path(output) / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    run_file = parts / RUN_FILE
    if machine_rank == 0:
        # No process writes yet (they meet in launch after this): what a killed run left half
        # written (overlays, maps, results) can go; its image is predicted again if its line is
        # not complete.
        for folder in _output_folders(Path(output)):
            remove_interrupted_writes(folder, (".png", ".json", ".csv", ".jsonl"))
        if resume:
            _check_settings(parts, settings)
        else:
            for old in _part_files(parts) + ([run_file] if run_file.is_file() else []):
                old.unlink()
        if not run_file.is_file():
            with atomic_write(run_file) as f:
                json.dump(settings, f, indent=1)
    if not resume:
        return list(images), 0
    done = predicted(output, ids)
    todo = [p for p in images if str(p) not in done]
    return todo, len(images) - len(todo)


def _output_folders(output: Path) -> List[Path]:
    """The folders predict writes with atomic_write: the output, its parts (run.json), its
    overlays, each image's maps folder."""
    folders = [output, output / PARTS_DIR, output / OVERLAYS_DIR]
    maps = output / "maps"
    if maps.is_dir() and not maps.is_symlink():
        folders += [maps] + sorted(p for p in maps.iterdir() if p.is_dir() and not p.is_symlink())
    return folders


def _check_settings(parts: Path, settings: Dict[str, Any]) -> None:
    run_file = parts / RUN_FILE
    if not run_file.is_file():
        if _part_files(parts):
            raise PartError(
                f"--resume: {parts} holds parts but no {RUN_FILE}, so the settings they were "
                "made with are unknown: predict into a new --output"
            )
        return  # nothing to resume: a fresh start
    try:
        with open(run_file) as f:
            before = json.load(f)
    except ValueError as e:
        raise PartError(f"--resume: {run_file}: not valid JSON ({e})") from e
    for key in sorted(set(before) | set(settings)):
        if before.get(key) != settings.get(key):
            raise PartError(
                f"--resume: {run_file}: the run was made with another {key} "
                f"({_difference(before.get(key), settings.get(key))}): resume with the same "
                "model and options, or predict into a new --output"
            )


def _difference(before, now) -> str:
    """The first differing line of two settings values, as 'then X, now Y'."""
    old = json.dumps(before).split("\\n") if not isinstance(before, str) else before.splitlines()
    new = json.dumps(now).split("\\n") if not isinstance(now, str) else now.splitlines()
    for a, b in zip(old + [""] * len(new), new + [""] * len(old)):
        if a != b:
            return f"then {a.strip()!r}, now {b.strip()!r}"
    return "then and now differ"


class PartWriter:
    """One process's part: a JSON line per image predicted, flushed as written.

    Opened for appending; a last line an earlier run left cut short is removed first, so the
    next line starts on a line of its own (its image is in this process's share again, as it is
    not among the complete ones).
    """

    def __init__(self, output: Path, rank: int):
        self.path = part_file(output, rank)
        _drop_cut_line(self.path)
        self._file = open(self.path, "a", encoding="ascii")
        self.written = 0

    def write(self, file: str, image_id, **fields) -> None:
        """The line of image ``file`` (its key first: :func:`_record_key` reads it cheaply)."""
        line = json.dumps({"file": file, "image_id": image_id, **fields})
        self._file.write(line + "\n")
        self._file.flush()
        self.written += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_cut_line(path: Path, block: int = 1 << 16) -> None:
    """Truncate ``path`` after its last newline (nothing if it is missing or ends in one)."""
    if not path.is_file():
        return
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            start = max(0, position - block)
            f.seek(start)
            chunk = f.read(position - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        else:
            keep = 0
        if keep != end:
            f.truncate(keep)


class MergeSummary(NamedTuple):
    images: int  # images with results
    lesions: int  # results written
    missing: List[str]  # inputs without a line (unreadable images)
    others: int  # images in the parts that are not among this run's inputs (left out)


def merge_parts(output: Path, images: Sequence[Path], ids: Dict[Path, Any],
                classes: Sequence[str]) -> MergeSummary:
    """Write ``coco_instances_results.json``, ``lesion_counts.csv``, ``images.json`` and, when
    a model gave image-level outputs, ``image_predictions.json`` from the parts, in the order of
    ``images``; each atomically, holding one image's line at a time.

    The results file is what ``json.dump`` of the whole list writes (the same bytes whatever the
    number of processes, and as when predict kept it in memory).
    """
    output = Path(output)
    index = predicted(output, ids)
    inputs = {str(p) for p in images}
    others = sum(1 for file in index if file not in inputs)
    done = [p for p in images if str(p) in index]
    with contextlib.ExitStack() as stack:
        handles = {part: stack.enter_context(open(part, "rb")) for part in _part_files(
            output / PARTS_DIR)}

        def records() -> Iterator[Tuple[Path, dict]]:
            for path in done:
                part, offset = index[str(path)]
                handles[part].seek(offset)
                yield path, json.loads(handles[part].readline())

        lesions, image_level = 0, False
        with atomic_write(output / COCO_RESULTS_FILE) as results, \
                atomic_write(output / "lesion_counts.csv") as counts:
            table = csv.DictWriter(counts, fieldnames=["file", "image_id"] + list(classes))
            table.writeheader()
            results.write("[")
            for path, record in records():
                for result in record["results"]:
                    results.write((", " if lesions else "") + json.dumps(result))
                    lesions += 1
                table.writerow({"file": path.name, "image_id": record["image_id"],
                                **record["counts"]})
                image_level = image_level or bool(record.get("image"))
            results.write("]")
        with atomic_write(output / "images.json") as f:
            json.dump({str(p): i for p, i in ids.items()}, f, indent=1)
        if image_level:  # a second pass, for models with image-level outputs only
            with atomic_write(output / "image_predictions.json") as f:
                f.write("{")
                first = True
                for path, record in records():
                    if record.get("image"):
                        entry = {"image_id": record["image_id"], **record["image"]}
                        f.write(("\n" if first else ",\n") + json.dumps(str(path)) + ": "
                                + json.dumps(entry))
                        first = False
                f.write("\n}\n")
    missing = [str(p) for p in images if str(p) not in index]
    return MergeSummary(len(done), lesions, missing, others)


# --- processes


def run_on_every_rank(function: Callable[..., Optional[int]], args: tuple, launch_args) -> int:
    """``function(*args)`` in each process of the run (``launch_args``: the parsed launch flags)
    and its exit status: 0, or the first failed process's (after the error line it printed).

    One process runs ``function`` here, in this process. Several are started with
    :func:`retina_d2.engine.launch` (Detectron2's; gloo on the CPU) and return once every one,
    on every machine, has ended ``function``.
    ``function`` must be importable by module and name (as ``retina_d2.tools.predict``'s
    ``predict_shard`` is): the started processes unpickle it by that reference.
    """
    if world_size(launch_args) == 1:
        return function(*args) or 0
    import torch.multiprocessing as mp

    from .launch import launch

    try:
        launch(
            _call,
            launch_args.num_gpus,
            num_machines=launch_args.num_machines,
            machine_rank=launch_args.machine_rank,
            dist_url=launch_args.dist_url,
            args=(function, args),
        )
    except mp.ProcessExitedException as e:  # its error line is printed already
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    return 0


def _call(function: Callable[..., Optional[int]], args: tuple) -> None:
    """Run ``function(*args)`` in a started process; a non-zero status is its exit code."""
    status = function(*args)
    if status:
        sys.exit(status)  # launch stops the other processes of this machine
    # Every process of every machine is done before any returns: machine 0 merges after this.
    comm.synchronize()
