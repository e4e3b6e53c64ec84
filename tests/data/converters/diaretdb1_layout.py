"""
DIARETDB1 v2.1 raw folders written in the published layout (``ddb1_v02_01/images``,
``groundtruth/<image>_0K.xml`` with ``_plain.xml`` twins, the official split lists), for the
converter's tests (test_diaretdb1.py) and the cross-dataset benchmark's (tests/benchmarks).
"""
from pathlib import Path
from typing import Dict, List, Sequence

from dataset_checks import write_image

HEIGHT, WIDTH = 96, 128
_DTD = (
    '<!DOCTYPE imgannotooldata SYSTEM '
    '"http://www.it.lut.fi/project/imageret/diaretdb1/imgannotool.dtd">\n'
)

# ---------------------------------------------------------------- the published layout


def circle(x, y, r, confidence="High", kind="Hard_exudates") -> dict:
    return {"region": ("circle", (x, y), r), "confidence": confidence, "type": kind}


def ellipse(x, y, rx, ry, angle, confidence="High", kind="Hard_exudates") -> dict:
    return {"region": ("ellipse", (x, y), rx, ry, angle), "confidence": confidence, "type": kind}


def polygon(vertices, confidence="High", kind="Hard_exudates") -> dict:
    return {"region": ("polygon", vertices), "confidence": confidence, "type": kind}


def _region_xml(region) -> str:
    kind = region[0]
    if kind == "circle":
        (x, y), r = region[1], region[2]
        return (f"<circleregion><centroid><coords2d>{x},{y}</coords2d></centroid>"
                f'<radius direction="x">{r}</radius></circleregion>')
    if kind == "ellipse":
        (x, y), rx, ry, angle = region[1:]
        return (f"<ellipseregion><centroid><coords2d>{x},{y}</coords2d></centroid>"
                f'<radius direction="x">{rx}</radius><radius direction="y">{ry}</radius>'
                f"<angle>{angle}</angle></ellipseregion>")
    vertices = region[1]
    cx = sum(v[0] for v in vertices) / len(vertices)
    cy = sum(v[1] for v in vertices) / len(vertices)
    corners = "".join(f"<coords2d>{x},{y}</coords2d>" for x, y in vertices)
    return (f"<polygonregion><centroid><coords2d>{cx:.0f},{cy:.0f}</coords2d></centroid>"
            f"{corners}</polygonregion>")


def expert_xml(image_name: str, markings: Sequence[dict], dtd: bool) -> str:
    """One expert's imgannotool file, as DIARETDB1 ships it (with or without the DTD line)."""
    body = []
    for m in markings:
        region = m["region"]
        point = region[1] if region[0] != "polygon" else region[1][0]
        body.append(
            "<marking>\n"
            f"{_region_xml(region)}\n"
            f"<representativepoint><coords2d>{point[0]},{point[1]}</coords2d>"
            "</representativepoint>\n"
            f"<confidencelevel>{m['confidence']}</confidencelevel>\n"
            f"<markingtype>{m['type']}</markingtype>\n"
            "</marking>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        + (_DTD if dtd else "")
        + "<imgannotooldata>\n<header>\n<creator>imgannotool</creator>\n"
        f"<imagename>{image_name}</imagename>\n"
        f"<imagesize><width>{WIDTH}</width><height>{HEIGHT}</height></imagesize>\n</header>\n"
        "<markinglist>\n" + "\n".join(body) + "\n</markinglist>\n</imgannotooldata>\n"
    )


def write_dataset(
    parent: Path,
    images: Dict[str, List[List[dict]]],
    train: Sequence[str],
    test: Sequence[str],
) -> Path:
    """``parent/ddb1_v02_01`` with each image (stem -> one marking list per expert), both XML
    twins per expert, the split lists and their _plain twins, and the macOS litter beside them."""
    root = parent / "ddb1_v02_01"
    for index, (stem, experts) in enumerate(images.items()):
        write_image(root / "images" / f"{stem}.png", HEIGHT, WIDTH, seed=index)
        for k, markings in enumerate(experts, start=1):
            gt = root / "groundtruth"
            gt.mkdir(parents=True, exist_ok=True)
            (gt / f"{stem}_{k:02d}.xml").write_text(expert_xml(f"{stem}.png", markings, True))
            (gt / f"{stem}_{k:02d}_plain.xml").write_text(
                expert_xml(f"{stem}.png", markings, False)
            )
    for split, stems in (("train", train), ("test", test)):
        for plain in ("", "_plain"):
            lines = [
                f"images/{s}.png "
                + " ".join(
                    f"groundtruth/{s}_{k:02d}{plain}.xml" for k in range(1, len(images[s]) + 1)
                )
                for s in stems
            ]
            (root / f"ddb1_v02_01_{split}{plain}.txt").write_text("\n".join(lines) + "\n")
    (root / "images" / "._diaretdb1_image001.png").write_bytes(b"\x00\x05\x16\x07")
    (root / "_DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


def four(markings: Sequence[dict]) -> List[List[dict]]:
    """The same markings from all four experts."""
    return [list(markings) for _ in range(4)]
