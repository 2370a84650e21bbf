"""Artifacts saved under an older diffusers load after an upgrade that added ``__init__`` arguments."""

import json
import warnings

import pytest
import torch
from diffusers.configuration_utils import FrozenDict

from diffusion_accel import artifact
from diffusion_accel.base_config import comparable_config, init_defaults, upgraded_from
from diffusion_accel.base_match import structure_fingerprint
from diffusion_accel.arch.registry import find_denoiser
from diffusion_accel.testing.tiny import TINY_BUILDERS, build_tiny, tiny_call_kwargs

NEW_ARGUMENT = "attention_type"  # an UNet2DConditionModel argument the tiny pipeline leaves at its default


def _export(pipe):
    return {}, {"conv_in.weight": pipe.unet.conv_in.weight.data}


def _restore(pipe, config, tensors):
    pipe.unet.conv_in.weight.data.copy_(tensors["conv_in.weight"])


artifact.register_technique("test-upgrade-scale", _export, _restore)


def _as_older_diffusers(pipe, argument: str = NEW_ARGUMENT):
    """``pipe`` as a diffusers release without ``argument`` built it: its config lacks the key."""
    pipe.unet._internal_dict = FrozenDict({k: v for k, v in pipe.unet.config.items() if k != argument})
    return pipe


def _accelerated(pipe):
    artifact.base_fingerprint(pipe)
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(2.0)
    artifact.mark_applied(pipe, "test-upgrade-scale")
    return pipe


def _images(pipe):
    return pipe(**tiny_call_kwargs("sd", steps=2)).images


def test_an_artifact_from_before_an_added_argument_loads_after_the_upgrade(tmp_path):
    """Fingerprints hash the config, so the same weights under a diffusers that added an argument (at its
    default) were refused as 'made for a different base model'."""
    accelerated = _accelerated(_as_older_diffusers(build_tiny("sd")))
    artifact.save(accelerated, tmp_path)
    assert NEW_ARGUMENT not in json.loads((tmp_path / "manifest.json").read_text())["base"]["config"]
    upgraded = build_tiny("sd")
    assert artifact.applied_techniques(artifact.load(upgraded, tmp_path)) == ["test-upgrade-scale"]
    assert torch.equal(_images(upgraded), _images(accelerated))


def test_saved_again_after_the_upgrade_it_keeps_loading(tmp_path):
    """A loaded pipeline saved again names the recorded base (fingerprint and config), not one it cannot hash."""
    artifact.save(_accelerated(_as_older_diffusers(build_tiny("sd"))), tmp_path / "old")
    resaved = artifact.load(build_tiny("sd"), tmp_path / "old")
    artifact.save(resaved, tmp_path / "again")
    for dtype in (torch.float32, torch.float16):  # the fingerprint, and the structure + weight-sample match
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dtype-change warning
            loaded = artifact.load(build_tiny("sd").to(dtype), tmp_path / "again")
        assert artifact.applied_techniques(loaded) == ["test-upgrade-scale"]


def test_an_added_argument_away_from_its_default_is_another_model(tmp_path):
    artifact.save(_accelerated(_as_older_diffusers(build_tiny("sd"))), tmp_path)
    changed = build_tiny("sd")
    changed.unet._internal_dict = FrozenDict({**changed.unet.config, NEW_ARGUMENT: "gated"})
    with pytest.raises(artifact.ArtifactError, match=f"different base model.*{NEW_ARGUMENT}: \\(absent\\) -> 'gated'"):
        artifact.load(changed, tmp_path)
    assert artifact.applied_techniques(changed) == []


def test_a_changed_or_dropped_config_value_is_still_refused(tmp_path):
    artifact.save(_accelerated(build_tiny("sd")), tmp_path)
    for base in (_as_older_diffusers(build_tiny("sd")), build_tiny("sd")):
        if NEW_ARGUMENT in base.unet.config:
            base.unet._internal_dict = FrozenDict({**base.unet.config, "norm_eps": 1e-6})
        with pytest.raises(artifact.ArtifactError, match="different base model"):
            artifact.load(base, tmp_path)


@pytest.mark.parametrize("family", sorted(TINY_BUILDERS))
def test_a_recorded_config_hashes_like_the_config_itself(family):
    """The manifest stores the config as JSON gives it back; hashing that must give the same fingerprints."""
    _, denoiser = find_denoiser(build_tiny(family))
    recorded = comparable_config(denoiser)
    assert artifact.fingerprint(denoiser, recorded) == artifact.fingerprint(denoiser)
    assert structure_fingerprint(denoiser, recorded) == structure_fingerprint(denoiser)
    assert upgraded_from(recorded, denoiser)


def test_upgraded_from_needs_every_added_key_at_its_init_default():
    unet = build_tiny("sd").unet
    recorded = comparable_config(unet)
    defaults = init_defaults(type(unet))
    at_default = {k: v for k, v in recorded.items() if k != NEW_ARGUMENT}
    assert recorded[NEW_ARGUMENT] == defaults[NEW_ARGUMENT] and upgraded_from(at_default, unet)
    assert not upgraded_from({**recorded, "removed_argument": 1}, unet)
    assert not upgraded_from({k: v for k, v in recorded.items() if k != "cross_attention_dim"}, unet)  # not default
    assert not upgraded_from(None, unet) and not upgraded_from([], unet)
