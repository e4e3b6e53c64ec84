"""Reproduce a paper's system with one command (``retina-d2 reproduce SYSTEM``): convert its raw
dataset, train its paper config, select the checkpoint on validation, score the test split once
under the paper's protocol and the toolkit's standard one, and set ours beside the published
figures.

Each system of :data:`SYSTEMS` names its converter (and the options the paper needs), its config
(a file of the paper configs folder, ``--configs``), its validation and test datasets, its paper's protocols and its key in
``retina_d2/evaluation/published_figures.yaml``. A run's folder (``--output``)::

    reproduce_state.json   the stages done (convert, [lesion_train,] train, test), written
                           atomically after each; --resume skips them
    datasets/<dataset>/    the conversion (RETINA_D2_DATASETS of the stages)
    lesion_train/          two-step systems: the frozen lesion branch's training run
    train/                 the training run (checkpoints, model_best.pth, validation metrics)
    test/                  the test split scored once with the selected checkpoint
                           (inference/<test dataset>/, its metrics files and report)
    reproduce.json, .md    the table: metric | paper's figure (source) | ours | difference

Selection is on the validation split only: ``model_best.pth``, saved by the config's
``RETINA.EVAL.BEST_METRIC`` on the validation dataset; the test split is scored once, after
training. The stages run in this process, one after another; an interrupted run continues with
``--resume`` from the first stage not recorded as done (training from its ``last_checkpoint``).
"""
import datetime
import json
import logging
import os
import sys
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "DEFAULT_CONFIGS",
    "STATE_FILE",
    "PaperSystem",
    "ReproduceError",
    "SYSTEMS",
    "Reproduction",
    "config_path",
    "reproduce",
    "stage_names",
]

logger = logging.getLogger(__name__)

# Where the paper configs are looked for unless --configs says: the configs/ folder of the
# checkout the command runs in (relative to the current folder). The package never looks beside
# itself: an installed wheel has no configs, and a user's own copy of them works the same way.
DEFAULT_CONFIGS = Path("configs")
STATE_FILE = "reproduce_state.json"
STATE_FORMAT = 1
# Keys reproduce sets itself in every stage (the user's opts may not).
_RESERVED_KEYS = ("OUTPUT_DIR", "DATASETS.TRAIN", "DATASETS.TEST")
# The figures a test-split run is compared with: the paper's test figures, and those whose paper
# does not say the split (compared with our test split; their notes say so).
_TEST_SPLITS = ("test", "unstated")


class ReproduceError(ValueError):
    """A run that cannot go on: a bad --output, a resumed run with other arguments, a missing
    config or split; the message names the file or folder."""


def _require_retinal_lesions_splits(root: Path) -> None:
    """Retinal-Lesions has no published split; the converter reads train.txt / val.txt /
    test.txt when they are there, and reproduce needs all three."""
    from .data.converters import retinal_lesions

    dataset_root = retinal_lesions.find_dataset_root(root)
    missing = [s for s in retinal_lesions.SPLITS if not (dataset_root / f"{s}.txt").is_file()]
    if missing:
        raise ReproduceError(
            f"{dataset_root}: no {', '.join(f'{s}.txt' for s in missing)}: the paper splits the "
            "images 70 / 10 / 20 at random and publishes no list, and reproduce selects on val "
            "and scores test; write train.txt, val.txt and test.txt there (one image id a line)"
        )


@dataclass(frozen=True)
class PaperSystem:
    """One paper's system, as ``reproduce`` runs it."""

    name: str  # the command's SYSTEM and the key of its figures in published_figures.yaml
    converter: str  # retina_d2.data.converters.CONVERTER_MODULES key
    config: str  # file name in the configs folder (--configs)
    val_dataset: str  # model selection (the config's DATASETS.TEST)
    test_dataset: str  # scored once with the selected checkpoint
    protocols: Tuple[str, ...] = ()  # the paper's own, added to RETINA.EVAL.PROTOCOLS
    # keyword arguments of the converter's convert(): the options the paper needs
    convert_flags: Mapping[str, object] = field(default_factory=dict)
    # a two-step system: the lesion system whose model_best.pth it freezes, trained first
    lesion_system: str = ""
    # config overrides the paper config lacks (KEY VALUE ...), before the user's opts
    overrides: Tuple[str, ...] = ()
    # checks the raw dataset can give the splits before anything is converted
    preflight: Optional[Callable[[Path], None]] = None
    note: str = ""  # what the table's reader must know about this run


def _system(*args, **kwargs) -> Tuple[str, PaperSystem]:
    system = PaperSystem(*args, **kwargs)
    return system.name, system


# SYSTEM -> how to reproduce it. Configs are the paper configs (in --configs); the protocols are
# those of the system's entry in published_figures.yaml.
SYSTEMS: "OrderedDict[str, PaperSystem]" = OrderedDict([
    _system(
        "eophtha-maskrcnn", "eophtha", "maskrcnn_eophtha.yaml",
        "eophtha_seg_val", "eophtha_seg_test", ("per_image_map",),
        # The paper's data: its 195 lesion images split 155 / 20 / 20, microaneurysms dilated
        # 5x5 twice at a 1024 px field of view before instance splitting.
        convert_flags={"subset": "both", "paper_split": True, "ma_dilation_scale": "1024"},
    ),
    _system(
        "idrid-resunet", "idrid", "resunet_idrid.yaml",
        "idrid_seg_val", "idrid_seg_test", ("argmax_dice",),
        note="selected on the validation images carved from IDRiD's training set "
        "(retina_d2/data/splits/idrid_val.json), not on the test set as the report did",
    ),
    _system(
        "retinal-lesions-lesionnet", "retinal_lesions", "lesionnet16s_retinal_lesions.yaml",
        "retinal_lesions_seg_val", "retinal_lesions_seg_test", (),
        preflight=_require_retinal_lesions_splits,
    ),
    _system(
        "ddr-cbam-deeplab", "ddr", "cbam_deeplab_ddr.yaml",
        "ddr_seg_valid", "ddr_seg_test", ("component_ap",),
    ),
    _system(
        "idrid-redseg", "idrid", "redseg_idrid.yaml",
        "idrid_seg_val", "idrid_seg_test", ("pr_operating_point",),
    ),
    # Two-step systems: the lesion system above is trained first (selected on its validation
    # split), then the grading network on its frozen model_best.pth.
    _system(
        "idrid-resunet-grading", "idrid", "multitask_idrid.yaml",
        "idrid_grading_val", "idrid_grading_test", (), lesion_system="idrid-resunet",
        note="needs IDRiD parts A (lesion masks, for the frozen ResUNet) and B (grades)",
    ),
    _system(
        "retinal-lesions-lesionnet-grading", "retinal_lesions",
        "multitask_retinal_lesions.yaml",
        "retinal_lesions_seg_val", "retinal_lesions_seg_test", (),
        lesion_system="retinal-lesions-lesionnet", preflight=_require_retinal_lesions_splits,
    ),
])


def config_path(system: PaperSystem, configs: Path = DEFAULT_CONFIGS) -> Path:
    """The system's config file in the ``configs`` folder; ReproduceError when it is not there."""
    path = Path(configs) / system.config
    if not path.is_file():
        raise ReproduceError(
            f"{path} not found: reproduce trains the paper configs of a retina_d2 checkout; run "
            "it from the checkout's root or pass --configs <checkout>/configs"
        )
    return path


def stage_names(system: PaperSystem) -> List[str]:
    """The stages of a run, in order."""
    return ["convert"] + (["lesion_train"] if system.lesion_system else []) + ["train", "test"]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, obj) -> None:
    from .data.converters.base import write_json_atomic

    write_json_atomic(path, obj, indent=2)


def _opt_keys(opts: Sequence[str]) -> List[str]:
    if len(opts) % 2:
        raise ReproduceError(
            f"opts are KEY VALUE pairs; got an odd number ({len(opts)}): {' '.join(opts)}"
        )
    return [str(k) for k in opts[0::2]]


@contextmanager
def _datasets_root(root: Path):
    """RETINA_D2_DATASETS pointing at the run's conversion while a stage runs."""
    old = os.environ.get("RETINA_D2_DATASETS")
    os.environ["RETINA_D2_DATASETS"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RETINA_D2_DATASETS", None)
        else:
            os.environ["RETINA_D2_DATASETS"] = old


def _release_loggers() -> None:
    """Undo a stage's logger setup (Detectron2's default_setup adds a console and a log.txt
    handler per output folder), so that the next stage, logging to its own folder, does not
    print every line twice."""
    from detectron2.utils.logger import setup_logger

    for name in ("detectron2", "fvcore", "retina_d2"):
        log = logging.getLogger(name)
        for handler in list(log.handlers):
            log.removeHandler(handler)
    setup_logger.cache_clear()


def _best_record(path: Path) -> Dict[str, object]:
    """What model_best.pth was selected by: its metric, score and iteration (stored beside the
    weights by LesionBestCheckpointer)."""
    import torch

    data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return {
        "metric": data.get("best_metric_name"),
        "score": data.get("best_metric"),
        "iteration": data.get("iteration"),
    }


class Reproduction:
    """One run of ``reproduce``: its folder, its state file and its stages.

    Args:
        system: a :data:`SYSTEMS` key.
        data_root: the raw dataset folder, as published.
        output: the run's folder (created; an existing one must be this system's earlier run,
            continued with ``resume``, or empty).
        opts: config overrides (KEY VALUE ...) for every stage.
        resume: continue the run in ``output`` from its first stage not done.
        configs: the folder of the paper configs (default: ``configs`` in the current folder).
    """

    def __init__(self, system: str, data_root, output, opts: Sequence[str] = (),
                 resume: bool = False, configs: Path = DEFAULT_CONFIGS, out=None):
        if system not in SYSTEMS:
            raise ReproduceError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
        self.system = SYSTEMS[system]
        self.lesion = SYSTEMS[self.system.lesion_system] if self.system.lesion_system else None
        self.data_root = Path(data_root).resolve()
        self.output = Path(output).resolve()
        self.opts = [str(o) for o in opts]
        self.resume = resume
        self.configs = Path(configs).resolve()
        self.out = out or sys.stdout
        reserved = sorted(set(_opt_keys(self.opts)) & set(_RESERVED_KEYS))
        if reserved:
            raise ReproduceError(
                f"opts may not set {', '.join(reserved)}: reproduce sets the output folders and "
                "the datasets of each stage itself (--output names the run's folder)"
            )
        if not self.data_root.is_dir():
            raise ReproduceError(f"--data-root {self.data_root}: no such folder")
        self.state_file = self.output / STATE_FILE
        self.datasets = self.output / "datasets"

    # ---------------------------------------------------------------- state
    def _say(self, text: str) -> None:
        print(f"[reproduce {self.system.name}] {text}", file=self.out, flush=True)

    def _identity(self) -> dict:
        return {"system": self.system.name, "data_root": str(self.data_root), "opts": self.opts}

    def open_state(self) -> dict:
        """The run's state: read back with ``resume``, else new (the folder must be new or
        empty: reproduce never writes into a folder it did not make)."""
        if self.output.exists() and not self.output.is_dir():
            raise ReproduceError(f"--output {self.output} is a file, not a folder")
        if self.state_file.is_file():
            if not self.resume:
                raise ReproduceError(
                    f"{self.output} holds a reproduce run already ({self.state_file}); pass "
                    "--resume to continue it, or choose another --output"
                )
            return self._read_state()
        if self.output.is_dir() and any(self.output.iterdir()):
            raise ReproduceError(
                f"--output {self.output} is not empty and holds no reproduce run ({STATE_FILE} "
                "missing): choose a new or empty folder"
            )
        if self.resume:
            self._say(f"nothing to resume in {self.output}: starting a new run")
        self.output.mkdir(parents=True, exist_ok=True)
        state = {"format": STATE_FORMAT, **self._identity(), "created": _now(), "stages": {}}
        _write_json(self.state_file, state)
        return state

    def _read_state(self) -> dict:
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ReproduceError(f"{self.state_file}: unreadable state ({e})") from e
        if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT
                and isinstance(state.get("stages"), dict)):
            raise ReproduceError(
                f"{self.state_file}: not a reproduce state of format {STATE_FORMAT}"
            )
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ReproduceError(
                    f"{self.state_file}: the run was started with {key} {state.get(key)!r}, not "
                    f"{value!r}; --resume continues a run with its own arguments"
                )
        return state

    def _done(self, state: dict, stage: str, **record) -> None:
        state["stages"][stage] = {"done": _now(), **record}
        _write_json(self.state_file, state)

    # ---------------------------------------------------------------- configs
    def stage_opts(self, system: PaperSystem, output_dir: Path, extra: Sequence[str] = ()):
        """A training or evaluation stage's overrides: the system's own, the user's, then what
        reproduce decides (they win): the stage's folder, the validation set, the paper's
        protocols beside the config's and the published system."""
        from .config import get_retina_cfg, merge_config

        cfg = get_retina_cfg()
        merge_config(cfg, str(config_path(system, self.configs)), [*system.overrides, *self.opts])
        protocols = list(cfg.RETINA.EVAL.PROTOCOLS)
        protocols += [p for p in system.protocols if p not in protocols]
        return [
            *system.overrides, *self.opts,
            "OUTPUT_DIR", str(output_dir),
            "DATASETS.TEST", repr((system.val_dataset,)),
            "RETINA.EVAL.PROTOCOLS", repr(protocols),
            "RETINA.EVAL.PUBLISHED_SYSTEM", system.name,
            *extra,
        ]

    def _merged(self, system: PaperSystem, opts: Sequence[str]):
        from .config import get_retina_cfg, merge_config

        cfg = get_retina_cfg()
        merge_config(cfg, str(config_path(system, self.configs)), opts)
        return cfg

    def check(self) -> None:
        """Before any work: the figures, every stage's config and opts, the paper's protocols
        against the model, the pretrained starts (fetched now, or one error line), and that the
        raw dataset can give the splits."""
        from .evaluation.protocols import check_protocols
        from .evaluation.published import published_system
        from .modeling.outputs import has_detector, has_semantic_head
        from .modeling.pretrained import fetch_weights

        published_system(self.system.name)
        for system, folder, extra in self._training_stages():
            cfg = self._merged(system, self.stage_opts(system, folder, extra))
            try:
                check_protocols(
                    cfg.RETINA.EVAL.PROTOCOLS, detector=has_detector(cfg),
                    semantic=has_semantic_head(cfg),
                    where=f"{system.config} RETINA.EVAL.PROTOCOLS",
                )
            except ValueError as e:  # an unknown protocol, or one the model cannot feed
                raise ReproduceError(str(e)) from e
            if extra:  # the grading step's lesion branch is the first step's output
                cfg.defrost()
                cfg.MODEL.MULTITASK.LESION_WEIGHTS = ""
            fetch_weights(cfg, training=True)
        if self.system.preflight is not None:
            self.system.preflight(self.data_root)

    def _training_stages(self):
        """(system, folder, extra overrides) of each training stage, in order."""
        stages = []
        if self.lesion is not None:
            stages.append((self.lesion, self.output / "lesion_train", ()))
            lesion_best = self.output / "lesion_train" / "model_best.pth"
            # The grading network starts from nothing but the frozen lesion branch (its config
            # keeps MODEL.WEIGHTS empty: a whole-model start would skip LESION_WEIGHTS).
            extra = ("MODEL.WEIGHTS", "", "MODEL.MULTITASK.LESION_WEIGHTS", str(lesion_best))
            stages.append((self.system, self.output / "train", extra))
        else:
            stages.append((self.system, self.output / "train", ()))
        return stages

    # ---------------------------------------------------------------- stages
    def convert(self, state: dict) -> None:
        from .data.converters import ConvertOptions, get_converter

        module = get_converter(self.system.converter)
        out = self.datasets / self.system.converter
        self._say(f"converting {self.data_root} -> {out}")
        # An interrupted conversion left no manifest, or one this run wrote: replace its files.
        options = ConvertOptions(overwrite=True, progress=False)
        summary = module.convert(self.data_root, out, options, **dict(self.system.convert_flags))
        names = self._converted_names(out)
        missing = [d for d in self._datasets_needed() if d not in names]
        if missing:
            raise ReproduceError(
                f"{out}: the conversion of {self.data_root} has no {', '.join(missing)} "
                f"(it has {', '.join(sorted(names)) or 'none'}): the raw dataset lacks the images "
                f"of that split"
            )
        self._done(state, "convert", folder=str(out), datasets=sorted(names),
                   images=_image_counts(summary))

    @staticmethod
    def _converted_names(conversion: Path) -> List[str]:
        from .data.register import read_manifest

        manifest, _ = read_manifest(conversion)
        return [f"{manifest['dataset']}_{task}_{split}"
                for task, splits in manifest["tasks"].items() for split in splits]

    def _datasets_needed(self) -> List[str]:
        systems = [self.lesion, self.system] if self.lesion is not None else [self.system]
        needed = []
        for system in systems:
            cfg = self._merged(system, [*system.overrides, *self.opts])
            needed += [*cfg.DATASETS.TRAIN, system.val_dataset, system.test_dataset]
        return list(OrderedDict.fromkeys(needed))

    def train(self, state: dict, stage: str, system: PaperSystem, folder: Path, extra) -> None:
        from .tools.train_net import build_parser, main

        resume = (folder / "last_checkpoint").is_file()
        self._say(f"training {system.config} -> {folder}"
                  + (" (resuming from its last checkpoint)" if resume else ""))
        argv = ["--config-file", str(config_path(system, self.configs))]
        argv += ["--resume"] if resume else []
        args = build_parser().parse_args(argv + self.stage_opts(system, folder, extra))
        try:
            with _datasets_root(self.datasets):
                main(args)
        finally:
            _release_loggers()
        self._done(state, stage, folder=str(folder), **self._selection(system, folder))

    def _selection(self, system: PaperSystem, folder: Path) -> dict:
        """The checkpoint the test split is scored with: model_best.pth (the validation
        split's best by RETINA.EVAL.BEST_METRIC); model_final.pth only when validation never
        gave a score to select by, said in the table."""
        best = folder / "model_best.pth"
        if best.is_file():
            return {"checkpoint": str(best), "selected_by": _best_record(best)}
        final = folder / "model_final.pth"
        cfg = self._merged(system, [*system.overrides, *self.opts])
        why = (f"no model_best.pth: {cfg.RETINA.EVAL.BEST_METRIC or 'RETINA.EVAL.BEST_METRIC'} "
               f"was never a finite number on {system.val_dataset}")
        if not final.is_file():
            raise ReproduceError(f"{folder}: {why}, and there is no model_final.pth to score")
        self._say(f"warning: {why}; the last model, {final.name}, is scored instead")
        return {"checkpoint": str(final), "selected_by": None, "selection_note": why}

    def test(self, state: dict) -> None:
        from .tools.train_net import build_parser, main

        checkpoint = state["stages"]["train"]["checkpoint"]
        folder = self.output / "test"
        self._say(f"scoring {self.system.test_dataset} once with {checkpoint} -> {folder}")
        # The training stage's own overrides (a two-step system's lesion branch), then the test
        # split in place of the validation split and the selected checkpoint.
        opts = self.stage_opts(self.system, folder, self._training_stages()[-1][2])
        opts += ["DATASETS.TEST", repr((self.system.test_dataset,)), "MODEL.WEIGHTS", checkpoint]
        argv = ["--config-file", str(config_path(self.system, self.configs)), "--eval-only"]
        try:
            with _datasets_root(self.datasets):
                results = main(build_parser().parse_args(argv + opts))
        finally:
            _release_loggers()
        from .evaluation.published import flatten_results

        flat = {k: _plain_number(v) for k, v in flatten_results(results or {}).items()}
        self._done(state, "test", folder=str(folder), dataset=self.system.test_dataset,
                   results=flat)

    # ---------------------------------------------------------------- table
    def write_table(self, state: dict) -> Tuple[Path, Path]:
        """reproduce.json and reproduce.md from the test stage's results."""
        from .evaluation.published import format_paper_vs_ours, paper_vs_ours, published_system

        published = published_system(self.system.name)
        test = state["stages"]["test"]
        train = state["stages"]["train"]
        rows = paper_vs_ours(published, test["results"], splits=_TEST_SPLITS)
        table = format_paper_vs_ours(published, rows)
        selection = _selection_text(train)
        protocol = ("the toolkit's standard evaluators (the paper's measures are among them)"
                    if published.protocol == "standard" else
                    f"{published.protocol} (the paper's) beside the toolkit's standard evaluators")
        notes = [f"test split: {self.system.test_dataset}, scored once with {selection}",
                 f"protocol: {protocol}"]
        if self.system.note:
            notes.append(self.system.note)
        if self.opts:
            notes.append(f"config overrides: {' '.join(self.opts)}")
        markdown = "\n".join(
            [f"# Reproducing {self.system.name}", "", *[f"- {n}" for n in notes], "", table, ""]
        )
        report = {
            "system": self.system.name,
            "paper": published.paper,
            "paper_title": published.paper_title,
            "paper_file": published.paper_file,
            "protocol": published.protocol,
            "config": str(config_path(self.system, self.configs)),
            "data_root": str(self.data_root),
            "opts": self.opts,
            "val_dataset": self.system.val_dataset,
            "test_dataset": self.system.test_dataset,
            "checkpoint": train["checkpoint"],
            "selected_by": train.get("selected_by"),
            "selection_note": train.get("selection_note", ""),
            "rows": [_row_json(r) for r in rows],
            "results": test["results"],
        }
        json_path, md_path = self.output / "reproduce.json", self.output / "reproduce.md"
        _write_json(json_path, report)
        from .data.converters.base import atomic_write

        with atomic_write(md_path) as f:
            f.write(markdown)
        print(markdown, file=self.out, flush=True)
        return json_path, md_path

    # ---------------------------------------------------------------- run
    def run(self) -> Tuple[Path, Path]:
        """Every stage not done yet, then the table. Returns (reproduce.json, reproduce.md)."""
        self.check()
        state = self.open_state()
        done = state["stages"]
        for name in stage_names(self.system):
            if name in done:
                self._say(f"{name}: done {done[name]['done']}, skipped")
                continue
            if name == "convert":
                self.convert(state)
            elif name == "test":
                self.test(state)
            else:
                system, folder, extra = self._training_stages()[0 if name == "lesion_train" else -1]
                self.train(state, name, system, folder, extra)
            self._say(f"{name}: done")
        return self.write_table(state)


def reproduce(system: str, data_root, output, opts: Sequence[str] = (), resume: bool = False,
              **kwargs) -> Tuple[Path, Path]:
    """Run (or with ``resume`` continue) the reproduction of ``system``; see :class:`Reproduction`.

    Returns:
        the paths of reproduce.json and reproduce.md.
    """
    return Reproduction(system, data_root, output, opts, resume, **kwargs).run()


def _image_counts(summary: Mapping) -> Dict[str, int]:
    """split name -> images, from a conversion summary (whatever tasks it has)."""
    counts = {}
    for task, splits in (summary.get("tasks") or {}).items():
        if not isinstance(splits, Mapping):
            continue
        for split, info in splits.items():
            if isinstance(info, Mapping) and "images" in info:
                counts[f"{task}/{split}"] = info["images"]
    return counts


def _plain_number(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN -> None (JSON null)


def _selection_text(train: Mapping) -> str:
    record = train.get("selected_by")
    name = Path(train["checkpoint"]).name
    if not record:
        return f"{name} ({train.get('selection_note', 'not selected')})"
    return (f"{name}, the best validation {record['metric']} = {record['score']:.4f} "
            f"(iteration {record['iteration']})")


def _row_json(row) -> dict:
    figure = row.figure
    return {
        "figure": figure.name,
        "metric": row.metric,
        "paper": row.paper,
        "paper_as_printed": figure.value,
        "unit": figure.unit,
        "bound": figure.bound,
        "source": row.source,
        "ours": row.ours,
        "difference": row.difference,
        "note": figure.note,
    }
