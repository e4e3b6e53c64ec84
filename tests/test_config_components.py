"""``add_retina_config`` is composed of one ``add_*_config`` per component: the composition adds
exactly the keys and defaults the single function had before the split (commit 50d8da2, read
from git), and each component can be applied alone to Detectron2's ``get_cfg()``."""
import inspect
import subprocess
import types
from pathlib import Path

import pytest
from detectron2.config import get_cfg

import retina_d2.config as config
from retina_d2.config import RETINA_CONFIG_COMPONENTS, add_retina_config, get_retina_cfg

REPO = Path(__file__).resolve().parents[1]
# The last commit whose add_retina_config was one function (the reference for the split).
BEFORE_SPLIT = "50d8da2"


def _flat(node, prefix=""):
    """{"A.B.C": value} for every leaf key of a config."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _added_by(add_config):
    """The leaf keys (with their values) that ``add_config`` adds to or changes in get_cfg()."""
    before = _flat(get_cfg())
    cfg = get_cfg()
    add_config(cfg)
    after = _flat(cfg)
    return {key: value for key, value in after.items() if key not in before or before[key] != value}


def _source_before_split() -> str:
    try:
        return subprocess.run(
            ["git", "show", f"{BEFORE_SPLIT}:retina_d2/config.py"], cwd=REPO, check=True,
            capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with commit {BEFORE_SPLIT} (not a git checkout of the repo)")


@pytest.fixture(scope="module")
def reference_cfg():
    """get_cfg() with the add_retina_config of the commit before the split."""
    module = types.ModuleType("retina_d2_config_before_split")
    exec(compile(_source_before_split(), "config.py@" + BEFORE_SPLIT, "exec"), module.__dict__)
    assert "add_retina_config" in module.__dict__ and "add_vgg_config" not in module.__dict__
    cfg = get_cfg()
    module.add_retina_config(cfg)
    return cfg


def test_composed_defaults_equal_the_single_function_before_the_split(reference_cfg):
    reference, now = _flat(reference_cfg), _flat(get_retina_cfg())
    missing = sorted(set(reference) - set(now))
    assert not missing, f"keys lost in the split: {missing}"
    changed = {k: (reference[k], now[k]) for k in reference if now[k] != reference[k]}
    assert not changed, f"defaults changed (before, now): {changed}"
    # Same types too (yacs refuses a merged value of another type: 1 vs 1.0, list vs tuple).
    retyped = {k: (type(reference[k]), type(now[k])) for k in reference
               if type(reference[k]) is not type(now[k])}
    assert not retyped, retyped


def test_dump_identical_when_no_key_was_added_since(reference_cfg):
    # The split itself adds nothing; keys added later by other changes are not its concern.
    if set(_flat(get_retina_cfg())) != set(_flat(reference_cfg)):
        pytest.skip("keys were added after the split; the test above covers the old ones")
    assert get_retina_cfg().dump() == reference_cfg.dump()


def test_every_add_config_function_is_composed():
    # A new add_*_config that add_retina_config forgot would leave its keys out of every config.
    defined = {
        name for name, value in inspect.getmembers(config, inspect.isfunction)
        if name.startswith("add_") and name.endswith("_config") and name != "add_retina_config"
        and value.__module__ == config.__name__
    }
    assert defined == {f.__name__ for f in RETINA_CONFIG_COMPONENTS}
    assert len(RETINA_CONFIG_COMPONENTS) == len(set(RETINA_CONFIG_COMPONENTS))
    assert all(name in config.__all__ for name in defined)


@pytest.mark.parametrize("add_config", RETINA_CONFIG_COMPONENTS, ids=lambda f: f.__name__)
def test_each_component_applies_alone_to_detectron2s_config(add_config):
    cfg = get_cfg()
    add_config(cfg)  # no other component needed before it (RETINA, RETINA.EVAL made on demand)
    added = _added_by(add_config)
    full = _flat(get_retina_cfg())
    new_keys = set(_flat(cfg)) - set(_flat(get_cfg()))
    assert new_keys, f"{add_config.__name__} adds no key"
    # Alone it gives each of its keys the default the whole composition gives.
    for key in new_keys:
        assert key in full and _flat(cfg)[key] == full[key], key
    # And it changes none of Detectron2's own defaults.
    assert set(added) == new_keys
    # Its keys then merge from a file's values like any Detectron2 key.
    key = sorted(new_keys)[0]
    cfg.merge_from_list([key, repr(full[key])])


def test_components_partition_the_added_keys():
    owners = {}
    for add_config in RETINA_CONFIG_COMPONENTS:
        cfg = get_cfg()
        add_config(cfg)
        for key in set(_flat(cfg)) - set(_flat(get_cfg())):
            owners.setdefault(key, []).append(add_config.__name__)
    shared = {key: names for key, names in owners.items() if len(names) > 1}
    assert not shared, f"keys added by more than one component: {shared}"
    assert set(owners) == set(_flat(get_retina_cfg())) - set(_flat(get_cfg()))


def test_components_compose_in_any_order():
    # RETINA and RETINA.EVAL are shared by several components: none may wipe another's keys.
    cfg = get_cfg()
    for add_config in reversed(RETINA_CONFIG_COMPONENTS):
        add_config(cfg)
    assert cfg.dump() == get_retina_cfg().dump()


def test_add_retina_config_still_refuses_a_frozen_config():
    cfg = get_cfg()
    cfg.freeze()
    with pytest.raises(AttributeError):
        add_retina_config(cfg)
