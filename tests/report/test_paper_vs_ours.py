"""The report's "paper vs ours" section: shown when the run's config names a published system,
with the paper's figures of the folder's split, ours read from the metrics files, and the
difference; absent otherwise; an unknown system is refused naming the config."""
import json
import re

import pytest

from retina_d2.report import ReportError, build_report
from retina_d2.report.paper_vs_ours import published_system_of, splits_of


def run_folder(tmp_path, system, dataset="eophtha_seg_test"):
    """OUTPUT_DIR/config.yaml and OUTPUT_DIR/inference/<dataset>/ with two metrics files."""
    out = tmp_path / "run"
    eval_dir = out / "inference" / dataset
    eval_dir.mkdir(parents=True)
    config = "RETINA:\n  EVAL:\n    BEST_METRIC: segm/AP50\n"
    if system is not None:
        config += f"    PUBLISHED_SYSTEM: {system}\n"
    (out / "config.yaml").write_text(config)
    (eval_dir / "per_image_map_metrics.json").write_text(json.dumps(
        {"per_image_map": {"mAP35": 40.0, "mAP50": 38.5, "mAP75": None, "images": 20}}))
    (eval_dir / "instance_metrics.json").write_text(json.dumps(
        {"segm": {"AP35": 30.25, "AP50": 28.0, "AP75": 10.0}}))
    return eval_dir


def section(page: str) -> str:
    match = re.search(r"<section><h2>Paper vs ours</h2>(.*?)</section>", page, re.S)
    return match.group(1) if match else ""


def rows(html: str):
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>.*?</td>", r)]
            for r in re.findall(r"<tr>(.*?)</tr>", html, re.S)]


def test_section_sets_the_test_figures_beside_ours(tmp_path):
    eval_dir = run_folder(tmp_path, "eophtha-maskrcnn")
    page = build_report(eval_dir, gallery_size=0).read_text()
    html = section(page)
    table = [r for r in rows(html) if r]
    assert table[0] == ["mAP35 [per_image_map/mAP35]", "45.62 (Table I, test)", "40.00", "-5.62"]
    assert table[1] == ["mAP35 [segm/AP35]", "45.62 (Table I, test)", "30.25", "-15.37"]
    assert table[4] == ["mAP75 [per_image_map/mAP75]", "20.71 (Table I, test)", "–", "–"]
    assert len(table) == 6  # test figures only: the folder is *_test
    assert "51.13" not in html  # the validation figure
    # Our cell points back into the metrics file it came from.
    assert 'data-source="per_image_map_metrics.json"' in html
    assert page.index("Paper vs ours") < page.index("Instance detection")


def test_validation_folder_gets_the_validation_figures(tmp_path):
    html = section(build_report(run_folder(tmp_path, "eophtha-maskrcnn", "eophtha_seg_val"),
                                gallery_size=0).read_text())
    assert "51.13 (Table I, val)" in html and "45.62" not in html


def test_baselines_are_listed_for_context(tmp_path):
    eval_dir = run_folder(tmp_path, "ddr-cbam-deeplab", "ddr_seg_test")
    html = section(build_report(eval_dir, gallery_size=0).read_text())
    assert "DeepLab-V3+" in html and "30.10 (Table I, test)" in html
    assert "33.26 (Table I, test)" in html  # the system's own mAP, not measured here
    assert "stated as the mean over lesions" in html  # the figure's note


def test_no_section_without_a_published_system(tmp_path):
    page = build_report(run_folder(tmp_path, None), gallery_size=0).read_text()
    assert "Paper vs ours" not in page and "Instance detection" in page


def test_unknown_system_is_refused_naming_the_config(tmp_path):
    eval_dir = run_folder(tmp_path, "eophtha")
    with pytest.raises(ReportError, match=r"config.yaml: RETINA.EVAL.PUBLISHED_SYSTEM: .*"
                                          r"no system 'eophtha'"):
        build_report(eval_dir, gallery_size=0)


def test_split_and_system_readers(tmp_path):
    assert splits_of(tmp_path / "idrid_seg_test") == ["test"]
    assert splits_of(tmp_path / "heimed_dev") is None
    config = tmp_path / "config.yaml"
    config.write_text("RETINA: {EVAL: {PUBLISHED_SYSTEM: idrid-redseg}}\n")
    assert published_system_of(config) == "idrid-redseg"
    config.write_text("[1, 2]\n")
    assert published_system_of(config) == "" and published_system_of(None) == ""
