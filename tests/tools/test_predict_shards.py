"""Prediction at archive scale (retina_d2/engine/predict_shards.py, tools/predict.py): shards over
processes, JSON-line parts merged in input order, --resume after a kill or a cut line."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from retina_d2.engine import predict_shards as shards
from retina_d2.tools import predict, train_net

REPO = Path(__file__).resolve().parents[2]

INSTANT = str(REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")


# --- the parts, by hand


def _settings(**changes):
    return {"weights": {"path": "m.pth", "bytes": 1, "mtime_ns": 2}, "config": "A: 1\nB: 2\n",
            "score_threshold": 0.5, **changes}


def _line(file, image_id, results=(), counts=None, **extra):
    return json.dumps({"file": file, "image_id": image_id, "results": list(results),
                       "counts": counts or {"exudate": len(results)}, **extra}) + "\n"


def _result(image_id, score):
    return {"image_id": image_id, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": score}


def test_shares_are_round_robin_disjoint_and_cover_every_image_once():
    todo = [f"{k}.png" for k in range(11)]
    for world in (1, 2, 3, 4):
        parts = [shards.share(todo, rank, world) for rank in range(world)]
        assert sorted(sum(parts, [])) == sorted(todo)
        assert all(part == sorted(part, key=todo.index) for part in parts)  # input order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shards.share(todo, 1, 3) == ["1.png", "4.png", "7.png", "10.png"]


def test_a_cut_last_line_is_not_done_and_is_dropped_before_the_next_line(tmp_path):
    part = shards.part_file(tmp_path, 0)
    part.parent.mkdir()
    whole = _line("a.png", 1) + _line("b.png", 2)
    part.write_text(whole + _line("c.png", 3)[:17])  # killed while writing c.png's line
    assert set(shards.predicted(tmp_path)) == {"a.png", "b.png"}
    with shards.PartWriter(tmp_path, 0) as writer:
        writer.write("c.png", 3, results=[], counts={})
    lines = part.read_text().splitlines(keepends=True)
    assert lines[:2] == whole.splitlines(keepends=True)
    assert json.loads(lines[2]) == {"file": "c.png", "image_id": 3, "results": [], "counts": {}}
    assert set(shards.predicted(tmp_path)) == {"a.png", "b.png", "c.png"}
    # A part that is one cut line only is emptied.
    other = shards.part_file(tmp_path, 1)
    other.write_text('{"file": "d.p')
    shards.PartWriter(tmp_path, 1).close()
    assert other.read_text() == ""


def test_records_are_read_whatever_their_key_order_and_a_foreign_line_is_named(tmp_path):
    part = shards.part_file(tmp_path, 3)
    part.parent.mkdir()
    part.write_text(json.dumps({"image_id": 7, "results": [], "file": "x.png"}) + "\n"
                    + _line('we"ird\u00e9.png', 8))
    found = shards.predicted(tmp_path)
    assert set(found) == {"x.png", 'we"ird\u00e9.png'}
    assert found['we"ird\u00e9.png'][1] == len(part.read_bytes().splitlines(keepends=True)[0])
    part.write_text(_line("x.png", 7) + "not json\n")
    with pytest.raises(shards.PartError, match=f"{part}: line 2 is not a prediction record"):
        shards.predicted(tmp_path)


def test_resume_refuses_other_settings_and_other_image_ids(tmp_path):
    images = [Path("a.png"), Path("b.png")]
    ids = {images[0]: 1, images[1]: 2}
    assert shards.start_parts(tmp_path, _settings(), False, images, ids) == (images, 0)
    shards.part_file(tmp_path, 0).write_text(_line("a.png", 1))
    assert shards.start_parts(tmp_path, _settings(), True, images, ids) == ([images[1]], 1)
    run_file = tmp_path / "parts" / "run.json"
    with pytest.raises(shards.PartError) as refused:
        shards.start_parts(tmp_path, _settings(score_threshold=0.2), True, images, ids)
    assert str(run_file) in str(refused.value) and "another score_threshold" in str(refused.value)
    with pytest.raises(shards.PartError, match="another config .then 'B: 2', now 'B: 3'"):
        shards.start_parts(tmp_path, _settings(config="A: 1\nB: 3\n"), True, images, ids)
    with pytest.raises(shards.PartError, match="gives a.png the image id 1, this run gives it 5"):
        shards.start_parts(tmp_path, _settings(), True, images, {images[0]: 5, images[1]: 2})
    run_file.unlink()  # parts whose settings are unknown
    with pytest.raises(shards.PartError, match="no run.json"):
        shards.start_parts(tmp_path, _settings(), True, images, ids)


def test_a_fresh_run_removes_only_predicts_own_files(tmp_path):
    images, ids = [Path("a.png")], {Path("a.png"): 1}
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("rank0.jsonl", "rank12.jsonl", "run.json", "rank1.jsonl.bak", "notes.txt"):
        (parts / name).write_text(_line("a.png", 1))
    assert shards.start_parts(tmp_path, _settings(), False, images, ids) == (images, 0)
    assert sorted(p.name for p in parts.iterdir()) == ["notes.txt", "rank1.jsonl.bak", "run.json"]
    assert json.loads((parts / "run.json").read_text()) == _settings()
    # Machine 1 neither clears nor records: machine 0 does.
    (parts / "rank0.jsonl").write_text(_line("a.png", 1))
    shards.start_parts(tmp_path, _settings(score_threshold=0.1), False, images, ids, 1)
    assert (parts / "rank0.jsonl").is_file()
    assert json.loads((parts / "run.json").read_text()) == _settings()


def test_temp_files_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    images, ids = [Path("a.png")], {Path("a.png"): 1}
    left = [tmp_path / "overlays" / ".a.png.77a9e487.tmp", tmp_path / ".images.json.0a1b2c3d.tmp",
            tmp_path / "maps" / "a" / ".exudate.png.deadbeef.tmp",
            tmp_path / "parts" / ".run.json.12345678.tmp"]
    kept = [tmp_path / "overlays" / "a.png", tmp_path / "overlays" / ".a.png.tmp",  # not ours
            tmp_path / "overlays" / ".notes.txt.77a9e487.tmp", tmp_path / "mine.tmp",
            tmp_path / "maps" / "a" / "exudate.png"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "parts" / "run.json").write_text(json.dumps(_settings()))
    # Machine 1 leaves them (machine 0's processes may be writing), machine 0 removes them.
    shards.start_parts(tmp_path, _settings(), True, images, ids, 1)
    assert all(p.exists() for p in left)
    shards.start_parts(tmp_path, _settings(), True, images, ids, 0)
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in kept)


def test_the_merge_is_in_input_order_whatever_wrote_the_parts(tmp_path):
    """Lines of two runs of different process counts, in any order: the merged files are those
    of the images in input order, the results file the bytes json.dump of the list writes."""
    images = [Path(f"/photos/{n}.png") for n in ("d", "a", "c", "b", "e")]
    ids = {p: k + 10 for k, p in enumerate(images)}
    own = {p: [_result(ids[p], s / 10) for s in range(k % 3)] for k, p in enumerate(images)}
    parts = tmp_path / "parts"
    parts.mkdir()
    lines = {p: _line(str(p), ids[p], own[p], counts={"exudate": len(own[p]), "haemorrhage": 0},
                      **({"image": {"dr_grade": {"grade": 1}}} if p.stem == "c" else {}))
             for p in images}
    (parts / "rank0.jsonl").write_text(lines[images[3]] + lines[images[0]])
    (parts / "rank1.jsonl").write_text(lines[images[2]] + _line("/elsewhere/z.png", 99)
                                       + lines[images[1]][:30])  # b's line cut short
    (parts / "rank2.jsonl").write_text(lines[images[1]])  # predicted again after the cut
    summary = shards.merge_parts(tmp_path, images, ids, ["exudate", "haemorrhage"])
    assert summary == shards.MergeSummary(images=4, lesions=3, missing=[str(images[4])], others=1)
    expected = [r for p in images[:4] for r in own[p]]
    assert (tmp_path / "coco_instances_results.json").read_text() == json.dumps(expected)
    with open(tmp_path / "lesion_counts.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"], int(r["image_id"]), int(r["exudate"])) for r in rows] == [
        (p.name, ids[p], len(own[p])) for p in images[:4]
    ]
    assert json.loads((tmp_path / "images.json").read_text()) == {str(p): ids[p] for p in images}
    assert json.loads((tmp_path / "image_predictions.json").read_text()) == {
        str(images[2]): {"image_id": ids[images[2]], "dr_grade": {"grade": 1}}
    }


def test_the_shard_function_is_pickled_by_name_and_its_status_is_the_exit_code(tmp_path):
    """Regression: retina-d2 loaded tools/predict.py by file path, so the started processes could
    not import the function they were handed. It is the package's now: pickled by module and
    name, it is the same function where it is unpickled; _call runs it there."""
    import pickle

    function = pickle.loads(pickle.dumps(predict.predict_shard))
    assert function is predict.predict_shard
    assert function.__module__ == "retina_d2.tools.predict"
    shards._call(_write_status, (str(tmp_path), 0))
    assert (tmp_path / "ran").read_text() == "0"
    with pytest.raises(SystemExit) as exited:
        shards._call(_write_status, (str(tmp_path), 2))
    assert exited.value.code == 2 and (tmp_path / "ran").read_text() == "2"


def _write_status(folder, status):
    Path(folder, "ran").write_text(str(status))
    return status


def test_launch_flags_are_checked():
    from types import SimpleNamespace as Args

    good = dict(num_gpus=2, num_machines=1, machine_rank=0, dist_url="auto")
    shards.check_arguments(Args(**good))
    for bad, flag in (({"num_gpus": 0}, "--num-gpus 0"), ({"machine_rank": 1}, "--machine-rank 1"),
                      ({"num_machines": 2, "machine_rank": 1}, "--dist-url auto")):
        with pytest.raises(ValueError, match=flag):
            shards.check_arguments(Args(**{**good, **bad}))


# --- tools/predict.py with a model trained for a few iterations

# Few iterations score low: keep at most 8 lesions of any score per image, so that results exist
# and the overlays stay quick to draw.
KEEP = ["--score-threshold", "0.0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "TEST.DETECTIONS_PER_IMAGE", "8"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread_per_process():
    """Every run of this module's comparisons on one CPU thread, in this process and in those it
    starts (OMP_NUM_THREADS, which launch's CPU workers and fresh interpreters read): the CPU
    kernels' float sums may differ in the last digit between thread counts, and the claim is
    that sharding changes nothing else."""
    import torch

    mp, threads = pytest.MonkeyPatch(), torch.get_num_threads()
    mp.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, synthetic_datasets):
    root = tmp_path_factory.mktemp("predict_shards")
    mp = pytest.MonkeyPatch()
    mp.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    train_net.cli(["--config-file", INSTANT, "OUTPUT_DIR", str(root / "run"),
                   "RETINA.EVAL.NUM_OVERLAYS", "0", "RETINA.EVAL.REPORT", "False"])
    mp.undo()
    return root / "run" / "model_final.pth"


@pytest.fixture(scope="module")
def photos(tmp_path_factory, synthetic_datasets):
    """8 photographs (the 6 synthetic ones, 2 of them twice under other names)."""
    folder = tmp_path_factory.mktemp("photos")
    sources = sorted((synthetic_datasets / "synthetic/raw/images").glob("*.png"))
    for k, source in enumerate(sources + sources[:2]):
        shutil.copy(source, folder / f"{k:02d}_{source.name}")
    return folder


@pytest.fixture(scope="module")
def single(weights, photos, tmp_path_factory):
    """The outputs of one process."""
    out = tmp_path_factory.mktemp("single") / "out"
    assert _predict(weights, photos, out) == 0
    return out


def _predict(weights, photos, out, *flags):
    return predict.main(["--weights", str(weights), "--input", str(photos), "--output", str(out),
                         *flags, *KEEP])


def _part_lines(out):
    """The complete lines of every part, as (file, image_id)."""
    return [json.loads(line)["file"] for part in sorted((out / "parts").glob("rank*.jsonl"))
            for _, line in shards.complete_lines(part)]


def _same_outputs(out, reference):
    for name in ("coco_instances_results.json", "lesion_counts.csv", "images.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(
        p.name for p in (reference / "overlays").iterdir())


def test_two_processes_give_the_single_process_results(weights, photos, single, tmp_path):
    results = json.loads((single / "coco_instances_results.json").read_text())
    assert len({r["image_id"] for r in results}) == 8  # every image has lesions to compare
    out = tmp_path / "out"
    assert _predict(weights, photos, out, "--num-gpus", "2") == 0
    _same_outputs(out, single)
    # Each process predicted its half: every other image, from its rank's.
    files = sorted(str(p) for p in photos.iterdir())
    for rank in (0, 1):
        lines = [json.loads(line) for _, line in
                 shards.complete_lines(out / "parts" / f"rank{rank}.jsonl")]
        assert [r["file"] for r in lines] == files[rank::2]


def test_two_machines_sharing_the_output_give_the_single_process_results(weights, photos,
                                                                         single, tmp_path):
    """--num-machines 2: two commands (here on one host, meeting at a TCP port), one process
    each; machine 0 merges both machines' parts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    runs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tools/predict.py"), "--weights", str(weights), "--input",
             str(photos), "--output", str(out), "--num-machines", "2", "--machine-rank",
             str(rank), "--dist-url", f"tcp://127.0.0.1:{port}", *KEEP],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    logs = [run.communicate(timeout=900)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "8 image(s)" in logs[0] and "image(s)," not in logs[1]  # machine 0 merged
    _same_outputs(out, single)
    files = sorted(str(p) for p in photos.iterdir())
    for rank in (0, 1):
        assert [json.loads(line)["file"] for _, line in shards.complete_lines(
            out / "parts" / f"rank{rank}.jsonl")] == files[rank::2]


def test_killed_half_way_and_resumed_nothing_is_predicted_twice_or_lost(weights, photos, single,
                                                                       tmp_path, capsys):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "tools/predict.py"), "--weights", str(weights),
               "--input", str(photos), "--output", str(out), "--num-gpus", "2", *KEEP]
    # Its own session: the kill reaches the processes it starts too.
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and run.poll() is None:
            if (out / "parts").is_dir() and len(_part_lines(out)) >= 2:
                break
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    before = _part_lines(out)
    assert 2 <= len(before) < 8
    for overlay in (out / "overlays").iterdir():  # written atomically: no half picture (a
        if not overlay.name.startswith("."):  # killed write leaves only a hidden temp file)
            Image.open(overlay).load()
    # Resumed by one process: the other's lines are kept, its cut line (if any) dropped.
    assert _predict(weights, photos, out, "--resume") == 0
    assert f"--resume: {len(before)} of 8 image(s) already predicted" in capsys.readouterr().err
    after = _part_lines(out)
    assert sorted(after) == sorted(str(p) for p in photos.iterdir())  # each image once
    assert set(before) <= set(after)  # what was predicted before the kill is kept
    _same_outputs(out, single)


def test_a_cut_last_line_is_dropped_and_its_image_predicted_again(weights, photos, single,
                                                                  tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(single, out)
    part = out / "parts" / "rank0.jsonl"
    lines = part.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    last = json.loads(lines[-1])["file"]
    (out / "coco_instances_results.json").unlink()
    assert _predict(weights, photos, out, "--resume") == 0
    assert "--resume: 7 of 8 image(s) already predicted, 1 to go" in capsys.readouterr().err
    assert part.read_bytes().splitlines(keepends=True)[:-1] == lines[:-1]
    assert json.loads(part.read_bytes().splitlines()[-1])["file"] == last
    assert len(_part_lines(out)) == 8
    _same_outputs(out, single)
