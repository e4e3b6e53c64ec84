"""Pretrained starts named by the paper configs: a file in exactly the published format (key names
and shapes from torchvision's constructors with ``weights=None``, or a Detectron2 model-zoo
Mask R-CNN pickled as the zoo does), filled with random values so that no tensor equals its
initial value by chance, is placed where the config's URL is cached and loaded through the
config's own ``MODEL.WEIGHTS``: every trunk tensor must then equal the file's (mapped by a table
written here, independently of the converters), mismatched heads keep their initialisation with
a warning naming them, and a renamed or missing tensor is reported by name.

Nothing here downloads: every test runs with empty temporary caches and RETINA_D2_OFFLINE set.
"""
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from detectron2.modeling import build_model

from retina_d2.config import get_retina_cfg
from retina_d2.modeling import LesionCheckpointer
from retina_d2.modeling.pretrained import (
    OFFLINE_ENV,
    WeightsUnavailableError,
    cache_path,
    part_weights,
    resolve_weights,
    torch_hub_path,
)

REPO = Path(__file__).resolve().parents[2]
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
ZOO_URL = (
    "detectron2://COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x/138205316/model_final_a3ec72.pkl"
)


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """Detectron2's (FVCORE_CACHE) and torch hub's (TORCH_HOME) caches in a fresh folder each;
    no download is ever attempted."""
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "fvcore_cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    return tmp_path


def _cfg(name):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(REPO / "configs" / name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _randomised(state, seed=0):
    """The state dict's names and shapes with random values: BN variances positive, step
    counters kept. A tensor left at its initial value can then never match the file."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = torch.zeros(value.shape, dtype=value.dtype)
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(value.shape, generator=g) * 0.05
    return out


def _place(url, state):
    """torch.save ``state`` where Detectron2's PathManager caches ``url``."""
    path = Path(cache_path(url))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _load_as_configured(cfg, model):
    """What the trainer does at a fresh start: parts' starts, then MODEL.WEIGHTS."""
    checkpointer = LesionCheckpointer(model, part_weights=part_weights(cfg))
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    return checkpointer.last_load_report


def _assert_loaded(model, expected):
    """Every (model name -> file tensor) pair of ``expected`` is in the model, equal."""
    state = model.state_dict()
    wrong = [k for k, v in expected.items() if k not in state or not torch.equal(state[k], v)]
    assert not wrong, f"{len(wrong)} tensors not loaded from the file, e.g. {wrong[:3]}"


# --- Red-Seg: ImageNet VGG16 -----------------------------------------------------------------

# torchvision vgg16().features index of each conv -> Red-Seg's trunk conv (written out by hand).
VGG16_TABLE = {
    0: "conv1.conv1_1", 2: "conv1.conv1_2",
    5: "conv2.conv2_1", 7: "conv2.conv2_2",
    10: "conv3.conv3_1", 12: "conv3.conv3_2", 14: "conv3.conv3_3",
    17: "conv4.conv4_1", 19: "conv4.conv4_2", 21: "conv4.conv4_3",
    24: "conv5.conv5_1", 26: "conv5.conv5_2", 28: "conv5.conv5_3",
}


@pytest.fixture(scope="module")
def vgg16_file_state():
    """torchvision's published vgg16 layout. The classifier (4096 x 25088 and 4096 x 4096, which
    the trunk drops) is saved as zero-stride tensors of its exact shapes, so the file holds
    every published name and shape in 60 MB instead of 528 MB."""
    with torch.device("meta"):
        layout = torchvision.models.vgg16(weights=None).state_dict()
    features = _randomised({k: v for k, v in layout.items() if k.startswith("features.")})
    classifier = {
        k: torch.zeros(()).expand(v.shape) for k, v in layout.items() if k.startswith("classifier.")
    }
    return {**features, **classifier}


@pytest.fixture(scope="module")
def redseg_model():
    torch.manual_seed(0)
    return build_model(_cfg("redseg_idrid.yaml"))


def test_redseg_loads_every_vgg16_conv_from_the_configured_url(vgg16_file_state, redseg_model):
    cfg = _cfg("redseg_idrid.yaml")
    assert cfg.MODEL.WEIGHTS == VGG16_URL
    _place(VGG16_URL, vgg16_file_state)
    report = _load_as_configured(cfg, redseg_model)
    expected = {
        f"backbone.{name}.{param}": vgg16_file_state[f"features.{index}.{param}"]
        for index, name in VGG16_TABLE.items()
        for param in ("weight", "bias")
    }
    _assert_loaded(redseg_model, expected)
    trunk = [k for k in redseg_model.state_dict() if k.startswith("backbone.")]
    assert sorted(trunk) == sorted(expected)  # the file sets the whole trunk
    assert report.trunk_loaded == report.trunk_total == 26 and not report.trunk_missing


def test_redseg_trunk_computes_what_torchvision_vgg16_computes(vgg16_file_state, redseg_model):
    _place(VGG16_URL, vgg16_file_state)
    _load_as_configured(_cfg("redseg_idrid.yaml"), redseg_model)
    with torch.device("meta"):
        reference = torchvision.models.vgg16(weights=None).features
    reference = reference.to_empty(device="cpu")
    reference.load_state_dict(
        {k[len("features."):]: v for k, v in vgg16_file_state.items() if k.startswith("features.")}
    )
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = redseg_model.backbone(image)["conv5"]
        theirs = reference[:30](image)  # up to the ReLU after conv5_3, before pool5
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("damage", ["renamed", "missing"])
def test_a_renamed_or_missing_vgg16_tensor_is_named(damage, vgg16_file_state, caplog):
    state = dict(vgg16_file_state)
    tensor = state.pop("features.28.weight")
    if damage == "renamed":
        state["features.28.kernel"] = tensor
    _place(VGG16_URL, state)
    torch.manual_seed(0)
    model = build_model(_cfg("redseg_idrid.yaml"))
    initial = model.backbone.conv5.conv5_3.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="retina_d2"):
        report = _load_as_configured(_cfg("redseg_idrid.yaml"), model)
    assert report.trunk_missing == ["backbone.conv5.conv5_3.weight"]
    assert report.trunk_loaded == report.trunk_total - 1
    assert torch.equal(model.backbone.conv5.conv5_3.weight, initial)
    assert "backbone.conv5.conv5_3.weight" in caplog.text


# --- CBAM-DeepLab: ImageNet ResNet-50 --------------------------------------------------------

def _torchvision_to_detectron2_name(key):
    """torchvision ResNet name -> Detectron2 ResNet name, written out independently."""
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[4:]
    layer, block, rest = re.match(r"layer(\d)\.(\d+)\.(.+)$", key).groups()
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"res{int(layer) + 1}.{block}.{rest}"


def test_cbam_deeplab_loads_torchvision_resnet50_with_frozen_bn(tmp_path):
    cfg = _cfg("cbam_deeplab_ddr.yaml")
    assert cfg.MODEL.WEIGHTS == RESNET50_URL
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])
    assert cfg.MODEL.PIXEL_STD == pytest.approx([0.229 * 255, 0.224 * 255, 0.225 * 255])
    file_state = _randomised(torchvision.models.resnet50(weights=None).state_dict())
    _place(RESNET50_URL, file_state)
    torch.manual_seed(0)
    model = build_model(cfg)
    report = _load_as_configured(cfg, model)
    expected = {
        "backbone." + _torchvision_to_detectron2_name(k): v
        for k, v in file_state.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    _assert_loaded(model, expected)
    trunk = [k for k in model.state_dict() if k.startswith("backbone.")]
    assert sorted(trunk) == sorted(expected)
    assert report.trunk_loaded == report.trunk_total == len(expected)

    # The same numbers: res2..res4 (res5 is dilated here) equal torchvision's layer1..layer3.
    reference = torchvision.models.resnet50(weights=None).eval()
    reference.load_state_dict(file_state)
    image = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        ours = model.backbone(image)
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(image))))
        for name, layer in (("res2", reference.layer1), ("res3", reference.layer2),
                            ("res4", reference.layer3)):
            x = layer(x)
            if name in ours:
                torch.testing.assert_close(ours[name], x, rtol=1e-4, atol=1e-4)


# --- Lesion-Net: ImageNet Inception-v3 encoder, and its grading CNN --------------------------

@pytest.fixture(scope="module")
def inception_file_state():
    published = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    return _randomised(published.state_dict(), seed=1)


def _inception_expected(file_state, prefix):
    return {
        prefix + k: v
        for k, v in file_state.items()
        if not k.startswith(("fc.", "AuxLogits.")) and not k.endswith("num_batches_tracked")
    }


def test_lesion_net_loads_torchvision_inception_v3(inception_file_state):
    cfg = _cfg("lesionnet16s_retinal_lesions.yaml")
    assert cfg.MODEL.WEIGHTS == INCEPTION_URL
    assert cfg.MODEL.BACKBONE.NAME == "build_inception_v3_backbone"
    _place(INCEPTION_URL, inception_file_state)
    model = build_model(cfg)
    report = _load_as_configured(cfg, model)
    expected = _inception_expected(inception_file_state, "backbone.")
    _assert_loaded(model, expected)
    trunk = [k for k in model.state_dict() if k.startswith("backbone.")]
    assert sorted(trunk) == sorted(expected)
    assert report.trunk_loaded == report.trunk_total == len(expected)
    # The classifiers have no place in an encoder: reported, not loaded.
    assert not report.unused


def test_a_missing_bn_statistic_is_named_not_silently_defaulted(inception_file_state):
    # Detectron2's FrozenBN fills running statistics a file lacks with 0 / 1 without a word;
    # the load report must still name the tensor.
    state = dict(inception_file_state)
    del state["Mixed_7c.branch_pool.bn.running_var"]
    _place(INCEPTION_URL, state)
    model = build_model(_cfg("lesionnet16s_retinal_lesions.yaml"))
    report = _load_as_configured(_cfg("lesionnet16s_retinal_lesions.yaml"), model)
    assert report.trunk_missing == ["backbone.Mixed_7c.branch_pool.bn.running_var"]


def test_inception_encoder_strides_are_exact_at_the_papers_size():
    from retina_d2.modeling.inception import InceptionV3Encoder

    encoder = InceptionV3Encoder(init_weights=False).eval()
    with torch.no_grad():
        features = encoder(torch.zeros(1, 3, 320, 224))
    for name, shape in encoder.output_shape().items():
        assert tuple(features[name].shape) == (1, shape.channels, 320 // shape.stride,
                                               224 // shape.stride), name
    # 896 px gives the paper's 28 x 28 stride-32 map.
    assert 896 // encoder.output_shape()["Mixed_7c"].stride == 28


def test_multitask_grading_cnn_starts_from_inception_v3(inception_file_state):
    cfg = _cfg("multitask_retinal_lesions.yaml")
    cfg.MODEL.MULTITASK.LESION_WEIGHTS = ""  # no lesion-only run in a test
    assert cfg.MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS == INCEPTION_URL and not cfg.MODEL.WEIGHTS
    _place(INCEPTION_URL, inception_file_state)
    torch.manual_seed(0)
    model = build_model(cfg)
    lesion_trunk = {k: v.clone() for k, v in model.lesion_model.backbone.state_dict().items()}
    _load_as_configured(cfg, model)
    _assert_loaded(model, _inception_expected(inception_file_state, "task_backbone."))
    # Only the grading CNN: the lesion branch is the lesion-only run's to set.
    for key, value in model.lesion_model.backbone.state_dict().items():
        assert torch.equal(value, lesion_trunk[key]), key


# --- e-ophtha Mask R-CNN: Detectron2 model-zoo R-101-FPN COCO ---------------------------------

@pytest.fixture(scope="module")
def zoo_pickle_state():
    """The zoo's mask_rcnn_R_101_FPN_3x (80 COCO classes) as the model zoo pickles it: NumPy
    arrays by Detectron2 name. The model is built on the meta device for its layout only."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    zoo_cfg = get_cfg()
    zoo_cfg.merge_from_file(
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml")
    )
    zoo_cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        layout = build_model(zoo_cfg).state_dict()
    rng = np.random.default_rng(2)
    model = {}
    for key, value in layout.items():
        if key.endswith("running_var"):
            model[key] = (rng.random(value.shape) + 0.5).astype(np.float32)
        else:
            model[key] = (rng.standard_normal(value.shape) * 0.05).astype(np.float32)
    return {"model": model, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}


def test_eophtha_maskrcnn_starts_from_the_zoo_with_new_class_heads(zoo_pickle_state, caplog):
    cfg = _cfg("maskrcnn_eophtha.yaml")
    assert cfg.MODEL.WEIGHTS == ZOO_URL
    assert (cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.NORM) == (101, "FrozenBN")
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 and cfg.INPUT.FORMAT == "BGR"
    assert cfg.MODEL.PIXEL_MEAN == [103.530, 116.280, 123.675]
    path = Path(cache_path(ZOO_URL))
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        pickle.dump(zoo_pickle_state, f)
    torch.manual_seed(0)
    model = build_model(cfg)
    heads = {
        "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias",
    }
    initial = {k: v.clone() for k, v in model.state_dict().items() if k in heads}
    with caplog.at_level(logging.WARNING, logger="retina_d2"):
        report = _load_as_configured(cfg, model)

    file_model = zoo_pickle_state["model"]
    expected = {k: torch.from_numpy(v) for k, v in file_model.items() if k not in heads}
    _assert_loaded(model, expected)
    # Everything but the class-count heads comes from COCO, trunk included.
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert sorted(set(ours) - heads) == sorted(expected)
    assert report.trunk_prefix == "backbone.bottom_up."
    assert report.trunk_loaded == report.trunk_total and not report.trunk_missing
    # 81 / 80-class heads cannot hold 2 lesions: fresh, and named in a warning.
    assert sorted(report.reinitialised) == sorted(heads)
    for key, value in initial.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert "re-initialised" in caplog.text
    assert "roi_heads.box_predictor.cls_score.weight" in caplog.text


# --- where the files are read from --------------------------------------------------------------

def test_cache_path_is_the_file_detectron2s_pathmanager_reads():
    from detectron2.utils.file_io import PathManager

    for url in (ZOO_URL, VGG16_URL):
        path = Path(cache_path(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"placeholder")
        assert PathManager.get_local_path(url) == str(path)
        assert resolve_weights(url) == str(path)


def test_torchvision_weights_are_found_in_torch_hubs_cache():
    hub = Path(torch_hub_path(VGG16_URL))
    assert hub.parent.name == "checkpoints"
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"placeholder")
    assert resolve_weights(VGG16_URL) == str(hub)
    assert torch_hub_path(ZOO_URL) is None  # not torchvision's


def test_an_uncached_url_offline_is_one_line_naming_url_file_and_override():
    with pytest.raises(WeightsUnavailableError) as raised:
        resolve_weights(ZOO_URL)
    message = str(raised.value)
    assert "\n" not in message
    assert "https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/" in message
    assert cache_path(ZOO_URL) in message
    assert "MODEL.WEIGHTS /path/to/model_final_a3ec72.pkl" in message


def test_an_unreachable_host_fails_as_no_network(monkeypatch):
    # .invalid never resolves (RFC 6761): the real network path, on any machine.
    monkeypatch.delenv(OFFLINE_ENV)
    url = "https://weights.invalid/models/vgg16-397923af.pth"
    reason = "no network: cannot reach weights.invalid:443"
    with pytest.raises(WeightsUnavailableError, match=reason) as raised:
        resolve_weights(url, key="MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS")
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith("MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS " + url)
    assert cache_path(url) in str(raised.value)


def test_behind_a_proxy_the_proxy_is_what_must_be_reachable(monkeypatch):
    monkeypatch.delenv(OFFLINE_ENV)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    with pytest.raises(WeightsUnavailableError, match="cannot reach proxy.invalid:3128"):
        resolve_weights(VGG16_URL)


def test_local_paths_are_used_as_given(tmp_path):
    assert resolve_weights("") == ""
    assert resolve_weights(str(tmp_path / "w.pth")) == str(tmp_path / "w.pth")


def test_resunet_trains_from_scratch_with_kaiming_init():
    # The ResUNet report trains from scratch with Kaiming (He-normal) initialisation.
    cfg = _cfg("resunet_idrid.yaml")
    assert cfg.MODEL.WEIGHTS == "" and not part_weights(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs
    for conv in convs:
        fan_in = conv.weight[0].numel()
        if conv.weight.numel() < 20000:
            continue  # too few samples for a std estimate
        assert conv.weight.std().item() == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.05)
        assert not conv.bias.any()


# Each paper config's start: (MODEL.WEIGHTS, MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS).
PAPER_STARTS = {
    "maskrcnn_eophtha.yaml": (ZOO_URL, ""),
    "redseg_idrid.yaml": (VGG16_URL, ""),
    "cbam_deeplab_ddr.yaml": (RESNET50_URL, ""),
    "lesionnet16s_retinal_lesions.yaml": (INCEPTION_URL, ""),
    "multitask_retinal_lesions.yaml": ("", INCEPTION_URL),
}


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs").glob("**/*.yaml")), ids=lambda p: p.name
)
def test_paper_configs_name_their_papers_weights_and_the_others_none(path):
    if path.name.startswith("Base"):
        pytest.skip("a base, not a runnable config")
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(path))
    named = (cfg.MODEL.WEIGHTS, cfg.MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS)
    assert named == PAPER_STARTS.get(path.name, ("", ""))
