"""Save/load framework: manifest, fingerprints, mismatch errors, all-or-nothing restore."""

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_accel import artifact
from diffusion_accel.base_match import weight_sample
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs


def _export_scale(pipe):
    return {"factor": pipe.unet._test_scale}, {"conv_in.weight": pipe.unet.conv_in.weight.data}


def _restore_scale(pipe, config, tensors):
    if config["factor"] < 0:
        raise RuntimeError("restore failed on purpose")
    pipe.unet.conv_in.weight.data.copy_(tensors["conv_in.weight"])
    pipe.unet._test_scale = config["factor"]


artifact.register_technique("test-scale", _export_scale, _restore_scale)


def _scaled_pipe(factor: float = 2.0, pipe=None):
    pipe = build_tiny("sd") if pipe is None else pipe
    artifact.base_fingerprint(pipe)
    pipe.unet.conv_in.weight.data.mul_(factor)
    pipe.unet._test_scale = factor
    artifact.mark_applied(pipe, "test-scale")
    return pipe


def _images(pipe):
    return pipe(**tiny_call_kwargs("sd", steps=2)).images


def test_round_trip_reproduces_images_exactly(tmp_path):
    accelerated = _scaled_pipe()
    artifact.save(accelerated, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["techniques"][0]["name"] == "test-scale"
    assert manifest["base"]["denoiser"] == "UNet2DConditionModel"
    base = build_tiny("sd")
    loaded = artifact.load(base, tmp_path)
    assert loaded is base and artifact.applied_techniques(base) == ["test-scale"]
    assert torch.equal(_images(loaded), _images(accelerated))


def test_any_os_pathlike_folder_is_accepted(tmp_path):
    """Only str and Path were: another os.PathLike (a py.path, a custom class) was a TypeError."""

    class Folder:
        def __init__(self, path):
            self.path = path

        def __fspath__(self):
            return str(self.path)

    accelerated = _scaled_pipe()
    assert artifact.save(accelerated, Folder(tmp_path / "a")) == tmp_path / "a"
    loaded = artifact.load(build_tiny("sd"), Folder(tmp_path / "a"))
    assert torch.equal(_images(loaded), _images(accelerated))


def test_a_loaded_artifact_leaves_no_file_mapped(tmp_path):
    """Its tensors viewed the memory-mapped safetensors file for the pipeline's life: Windows refuses to
    replace a mapped file, so saving back into the same folder failed after removing the old manifest."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps (Linux)")
    import diffusion_accel as da

    config = da.PTQConfig(calib_prompts=1, calib_num_steps=2, calib_steps="all")
    artifact.save(da.quantize_(build_tiny("sd"), config), tmp_path)
    loaded = artifact.load(build_tiny("sd"), tmp_path)
    assert str(tmp_path) not in maps.read_text()
    artifact.save(loaded, tmp_path)  # back into its own folder
    assert torch.equal(_images(artifact.load(build_tiny("sd"), tmp_path)), _images(loaded))


def test_a_loaded_pipeline_saved_again_with_a_technique_stacked_loads_on_the_same_base(tmp_path):
    """After load, base_fingerprint hashed the accelerated weights, so the stacked artifact named them as
    its base and every later load of it was refused as 'made for a different base model'."""
    import diffusion_accel as da

    config = da.PTQConfig(calib_prompts=1, calib_num_steps=2, calib_steps="all")
    artifact.save(da.quantize_(build_tiny("sd"), config), tmp_path / "ptq")
    stacked = da.enable_cache(artifact.load(build_tiny("sd"), tmp_path / "ptq"), da.DeepCacheConfig(interval=2))
    artifact.save(stacked, tmp_path / "both")
    again = artifact.load(build_tiny("sd"), tmp_path / "both")
    assert artifact.applied_techniques(again) == ["ptq", "cache"]
    assert torch.equal(_images(again), _images(stacked))


def test_saving_a_pipeline_with_no_technique_warns_and_loads_as_the_base(tmp_path):
    """It wrote an empty artifact silently (usually a forgotten quantize_ / prune_ / enable_cache)."""
    with pytest.warns(UserWarning, match="no technique applied"):
        artifact.save(build_tiny("sd"), tmp_path)
    base = build_tiny("sd")
    unet = base.unet
    assert artifact.load(base, tmp_path) is base and artifact.applied_techniques(base) == []
    assert base.unet is unet  # not a copy: a compiled wrapper stays


def test_fingerprint_ignores_dtype_but_not_weights():
    pipe = build_tiny("sd")
    fp32 = artifact.fingerprint(pipe.unet)
    assert artifact.fingerprint(pipe.unet.to(torch.bfloat16)) == fp32
    assert artifact.fingerprint(build_tiny("sd", seed=1).unet) != fp32


def test_fingerprint_reads_transformers_configs():
    pipe = build_tiny("sd")  # its text encoder is a transformers CLIPTextModel (config is not a dict)
    encoder = pipe.text_encoder
    before = artifact.fingerprint(encoder)
    assert artifact.fingerprint(encoder.to(torch.bfloat16)) == before
    with torch.no_grad():
        next(encoder.parameters()).mul_(2)
    assert artifact.fingerprint(encoder) != before


def test_fingerprint_is_the_same_under_another_transformers_version(monkeypatch):
    """transformers writes its own version into every config dict; the model has not changed."""
    import transformers.configuration_utils as configuration_utils

    encoder = build_tiny("sd").text_encoder
    before = artifact.fingerprint(encoder)
    monkeypatch.setattr(configuration_utils, "__version__", "0.0.1")
    assert encoder.config.to_dict()["transformers_version"] == "0.0.1"
    assert artifact.fingerprint(encoder) == before


def test_loading_onto_another_model_is_a_clear_error(tmp_path):
    artifact.save(_scaled_pipe(), tmp_path)
    other = build_tiny("sd", seed=1)
    with pytest.raises(artifact.ArtifactError, match="different base model"):
        artifact.load(other, tmp_path)
    assert artifact.applied_techniques(other) == []
    assert not [name for name in vars(other.unet) if name.startswith("_diffusion_accel")]  # session 31: cached


def test_failed_restore_leaves_pipeline_unchanged(tmp_path):
    artifact.save(_scaled_pipe(factor=-1.0), tmp_path)
    base = build_tiny("sd")
    unet_before, weights_before = base.unet, base.unet.conv_in.weight.clone()
    with pytest.raises(artifact.ArtifactError, match="RuntimeError: .*on purpose"):
        artifact.load(base, tmp_path)
    assert base.unet is unet_before and torch.equal(base.unet.conv_in.weight, weights_before)
    assert artifact.applied_techniques(base) == []


def test_a_load_failing_in_its_second_technique_leaves_the_pipeline_object_unchanged(tmp_path):
    """The first technique's restore put guards on the pipeline (save_pretrained, load_lora_weights); the
    denoiser was rolled back when the second failed, the pipeline kept them."""
    import diffusion_accel as da
    from safetensors.torch import save_file

    pipe = build_tiny("sd")
    da.prune_(pipe, da.PruneConfig(method="magnitude", sparsity=0.5))
    da.quantize_(pipe, da.PTQConfig(calib_prompts=1, calib_num_steps=2, calib_steps="all"))
    artifact.save(pipe, tmp_path)
    tensors = load_file(tmp_path / "01-ptq.safetensors")
    tensors[_first(tensors, ".weight_scale")] *= -1
    save_file(tensors, tmp_path / "01-ptq.safetensors")
    base = build_tiny("sd")
    attributes_before, unet_before = dict(vars(base)), base.unet
    with pytest.raises(artifact.ArtifactError, match=r"weight_scale' .* not nonnegative"):
        artifact.load(base, tmp_path)
    assert base.unet is unet_before and artifact.applied_techniques(base) == []
    assert vars(base).keys() == attributes_before.keys()


def test_bad_folders_are_rejected(tmp_path):
    with pytest.raises(artifact.ArtifactError, match="no manifest.json"):
        artifact.load(build_tiny("sd"), tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(artifact.ArtifactError, match="expected"):
        artifact.read_manifest(tmp_path)


def test_saving_to_a_path_that_cannot_be_a_folder_is_an_artifact_error(tmp_path):
    """They were bare FileExistsError / NotADirectoryError from mkdir."""
    pipe = _scaled_pipe()
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(artifact.ArtifactError, match=r"'.*a-file': it is a file, not a folder"):
        artifact.save(pipe, tmp_path / "a-file")
    with pytest.raises(artifact.ArtifactError, match=r"cannot create the artifact folder '.*a-file/sub': Not a directory"):
        artifact.save(pipe, tmp_path / "a-file" / "sub")
    assert (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_save_path_is_refused_not_the_current_folder(tmp_path, monkeypatch, path):
    """``save(pipe, "")`` wrote manifest.json and the tensors into the working directory (session 31)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(artifact.ArtifactError, match="the path is empty"):
        artifact.save(_scaled_pipe(), path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "manifest.json").write_text("{not json"), r"manifest.json is not valid JSON"),
    (lambda folder: (folder / "manifest.json").write_text("[1, 2]"), r"format 'a JSON list'"),
    (lambda folder: (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000),
     r"manifest.json is not valid JSON \(RecursionError"),
    (lambda folder: (folder / "manifest.json").write_text('{"format_version": 1' + "0" * 5000 + "}"),
     r"manifest.json is not valid JSON \(ValueError: Exceeds the limit"),
    (lambda folder: (folder / "00-test-scale.safetensors").unlink(), r"00-test-scale.safetensors is missing"),
    (lambda folder: (folder / "00-test-scale.safetensors").write_bytes(b"garbage"),
     r"00-test-scale.safetensors is not readable safetensors"),
])
def test_a_damaged_artifact_is_an_artifact_error_naming_the_file(tmp_path, damage, message):
    """Was a bare JSONDecodeError / FileNotFoundError / SafetensorError naming no artifact file."""
    artifact.save(_scaled_pipe(), tmp_path)
    damage(tmp_path)
    base = build_tiny("sd")
    unet_before = base.unet
    with pytest.raises(artifact.ArtifactError, match=message):
        artifact.load(base, tmp_path)
    assert base.unet is unet_before and artifact.applied_techniques(base) == []


def _edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("techniques"), r"field 'techniques' must be present: it is missing"),
    (lambda m: m.update(techniques="00-test-scale"), r"field 'techniques' must be a list, got str"),
    (lambda m: m["techniques"][0].pop("name"), r"field 'techniques\[0\].name' must be present"),
    (lambda m: m["techniques"][0].pop("config"), r"field 'techniques\[0\].config' must be present"),
    (lambda m: m["techniques"].append(dict(m["techniques"][0])),
     r"'techniques\[1\].name' must be a technique not listed before, got 'test-scale' a second time"),
    (lambda m: m.pop("base"), r"field 'base' must be present"),
    (lambda m: m["base"].pop("fingerprint"), r"field 'base.fingerprint' must be present"),
    (lambda m: m["base"].update(source="tiny:sd"), r"field 'base.source' must be an object or null, got str"),
    (lambda m: m.update(format_version="1"), r"field 'format_version' must be an integer, got str '1'"),
    (lambda m: m.update(format_version=0), r"field 'format_version' must be an integer >= 1, got 0"),
    (lambda m: m.pop("format_version"), r"field 'format_version' must be present"),
    (lambda m: m["base"].update(source={"spec": ["tiny:sd"]}), r"field 'base.source.spec' must be a string or null"),
    (lambda m: m["base"].update(sample="../base-sample.safetensors"),
     r"field 'base.sample' must be a file name inside the artifact folder"),
    (lambda m: m["base"].update(dtype="float99"), r"field 'base.dtype' must be one of \[.*'float32'.*\] or null, got "
                                                   r"'float99'"),
    (lambda m: m["base"].update(dtype="int8"), r"field 'base.dtype' must be one of .* got 'int8'"),
    (lambda m: m["base"].update(dtype="half"), r"field 'base.dtype' must be one of .* got 'half'"),
    (lambda m: m["base"].update(source={"spec": "tiny:sd", "dtype": "fp99"}),
     r"field 'base.source.dtype' must be one of"),
    (lambda m: m["base"].update(source={"spec": "tiny:sd", "variant": "a/b"}),
     r"field 'base.source.variant' must be a weight-file variant name such as 'fp16', or null, got 'a/b'"),
])
def test_a_damaged_manifest_is_an_artifact_error_naming_the_field(tmp_path, edit, message):
    """Each was a bare KeyError / TypeError from inside load(); a bad dtype name loaded with a warning naming
    torch.float99 and failed load_pipeline naming neither manifest nor field (session 47)."""
    artifact.save(_scaled_pipe(), tmp_path)
    _edit_manifest(tmp_path, edit)
    base = build_tiny("sd")
    with pytest.raises(artifact.ArtifactError, match=message):
        artifact.load(base, tmp_path)
    assert artifact.applied_techniques(base) == []


@pytest.mark.parametrize("where", ["absolute", "parent", "subfolder"])
def test_a_manifest_cannot_point_load_at_files_outside_the_artifact(tmp_path, where):
    """A technique file named by an absolute path or through '..' used to be read from wherever it pointed."""
    other = tmp_path / "other"
    artifact.save(_scaled_pipe(), other)
    folder = tmp_path / "artifact"
    artifact.save(_scaled_pipe(), folder)
    name = {"absolute": str(other / "00-test-scale.safetensors"), "parent": "../other/00-test-scale.safetensors",
            "subfolder": "sub/00-test-scale.safetensors"}[where]
    _edit_manifest(folder, lambda m: m["techniques"][0].update(tensors=name))
    with pytest.raises(artifact.ArtifactError, match=r"'techniques\[0\].tensors' must be a file name inside the "
                                                      r"artifact folder"):
        artifact.load(build_tiny("sd"), folder)


@pytest.mark.parametrize("name, target, message", [
    ("00-test-scale.safetensors", "other", r"'techniques\[0\].tensors' must be a file inside the artifact folder, "
                                           r"got '00-test-scale.safetensors', a link to"),
    ("00-test-scale.safetensors", "itself", r"got '00-test-scale.safetensors', a link that does not resolve"),
    ("manifest.json", "other", r"manifest.json must be a file inside the artifact folder, got a link to"),
])
def test_artifact_files_linking_elsewhere_or_nowhere_are_refused(tmp_path, name, target, message):
    """A link to another folder's file was read from there; a link to itself (a loop) was a RuntimeError traceback
    the CLI's user errors leave out, and a linked manifest.json was read as this artifact's (session 53 review)."""
    other, folder = tmp_path / "other", tmp_path / "artifact"
    artifact.save(_scaled_pipe(), other)
    artifact.save(_scaled_pipe(), folder)
    (folder / name).unlink()
    (folder / name).symlink_to(other / name if target == "other" else name)
    with pytest.raises(artifact.ArtifactError, match=message):
        artifact.load(build_tiny("sd"), folder)


def test_save_refuses_folders_it_would_break_or_overwrite(tmp_path):
    """Saving into the folder the base was loaded from made both unloadable by spec; another tool's
    manifest.json was overwritten without a word."""
    pipe = _scaled_pipe()
    model = tmp_path / "model"
    build_tiny("sd").save_pretrained(model)
    with pytest.raises(artifact.ArtifactError, match=r"holds a diffusers pipeline \(model_index.json\)"):
        artifact.save(pipe, model)
    assert not (model / "manifest.json").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"tool": "other"}')
    with pytest.raises(artifact.ArtifactError, match=r"its manifest.json is not a diffusion_accel artifact's"):
        artifact.save(pipe, foreign)
    assert (foreign / "manifest.json").read_text() == '{"tool": "other"}'
    artifact.save(pipe, tmp_path / "ours")
    artifact.save(pipe, tmp_path / "ours")  # over an artifact of ours: fine
    (tmp_path / "taken" / "manifest.json").mkdir(parents=True)  # the tensors were moved in, then "Is a directory",
    with pytest.raises(artifact.ArtifactError, match=r"holds folders named \['manifest.json'\]"):  # staged files
        artifact.save(pipe, tmp_path / "taken")  # left behind (session 51)
    assert sorted(path.name for path in (tmp_path / "taken").iterdir()) == ["manifest.json"]


def test_a_save_failing_in_its_commit_leaves_no_staged_files(tmp_path, monkeypatch):
    """The commit ran outside the staging block: a failure there (a full disk at the manifest) left hidden
    '.*.diffusion_accel.partial' files in the folder."""
    import diffusion_accel.artifact_files as artifact_files

    def failing_replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact_files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        artifact.save(_scaled_pipe(), tmp_path / "art")
    assert list((tmp_path / "art").iterdir()) == []


def test_a_damaged_artifact_can_be_saved_again_and_user_files_stay(tmp_path):
    """load said 'the artifact is damaged: save it again', and save refused the folder as another tool's; every save
    deleted hidden '.*.partial' files of the user's."""
    pipe = _scaled_pipe()
    artifact.save(pipe, tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "diffusion_acc')
    (tmp_path / ".notes.partial").write_text("mine")
    with pytest.raises(artifact.ArtifactError, match="is damaged: save it again"):
        artifact.load(build_tiny("sd"), tmp_path)
    artifact.save(pipe, tmp_path)
    assert artifact.applied_techniques(artifact.load(build_tiny("sd"), tmp_path)) == ["test-scale"]
    assert (tmp_path / ".notes.partial").read_text() == "mine"


def test_load_warnings_through_a_pipeline_spec_point_at_the_callers_line(tmp_path):
    """The dtype-change warning of load_pipeline('BASE+ARTIFACT', dtype=...) pointed into loading.py."""
    from diffusion_accel.loading import load_pipeline

    artifact.save(_scaled_pipe(), tmp_path / "art")
    with pytest.warns(UserWarning) as caught:
        load_pipeline(f"tiny:sd+{tmp_path / 'art'}", dtype="bf16")
    assert caught and all(record.filename == __file__ for record in caught)


def test_loading_an_artifact_without_techniques_warns_and_onto_meta_weights_is_refused(tmp_path):
    with pytest.warns(UserWarning, match="no technique applied"):
        artifact.save(build_tiny("sd"), tmp_path)
    base = build_tiny("sd")
    with pytest.warns(UserWarning, match="holds no technique"):
        assert artifact.load(base, tmp_path) is base
    base.unet.to("meta")
    with pytest.raises(artifact.ArtifactError, match="weights on the meta device"):
        artifact.load(base, tmp_path)


def test_a_config_field_or_tensor_a_technique_needs_is_an_artifact_error_and_nothing_changes(tmp_path):
    """A technique's restore reading a field or tensor the artifact lacks raised a bare KeyError."""
    import diffusion_accel as da
    from safetensors.torch import save_file

    pipe = build_tiny("sd")
    calib = da.calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False)
    da.quantize_(pipe, da.PTQConfig.preset("w8a8"), calib=calib)
    artifact.save(pipe, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    _edit_manifest(tmp_path, lambda m: m["techniques"][0]["config"].pop("num_steps"))
    base = build_tiny("sd")
    unet_before = base.unet
    with pytest.raises(artifact.ArtifactError, match=r"technique 'ptq' cannot be restored .*KeyError: 'num_steps'"):
        artifact.load(base, tmp_path)
    assert base.unet is unet_before and artifact.applied_techniques(base) == []
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    tensors = load_file(tmp_path / "00-ptq.safetensors")
    first_codes = next(name for name in tensors if name.endswith(".codes"))
    save_file({name: value for name, value in tensors.items() if name != first_codes},
              tmp_path / "00-ptq.safetensors")
    with pytest.raises(artifact.ArtifactError, match=r"00-ptq.safetensors \(KeyError"):
        artifact.load(base, tmp_path)
    assert base.unet is unet_before and artifact.applied_techniques(base) == []



@pytest.fixture(scope="module")
def saved_artifacts(tmp_path_factory):
    """A W8A8 and a magnitude-pruned tiny SD artifact (folder by technique), saved once for the edits below."""
    import diffusion_accel as da

    folders = {}
    for technique in ("ptq", "prune", "structured"):
        pipe = build_tiny("sd")
        if technique == "ptq":
            da.quantize_(pipe, da.PTQConfig(calib_prompts=1, calib_num_steps=2, calib_steps="all"))
        else:
            da.prune_(pipe, da.PruneConfig(method="magnitude", sparsity=0.5 if technique == "prune" else 0.3,
                                           pattern="structured" if technique == "structured" else "unstructured"))
        folders[technique] = artifact.save(pipe, tmp_path_factory.mktemp(technique))
    return folders


def _first(tensors, suffix):
    return next(name for name in sorted(tensors) if name.endswith(suffix))


def _set(suffix, edit):
    def apply(tensors):
        name = _first(tensors, suffix)
        tensors[name] = edit(tensors[name])
    return apply


@pytest.mark.parametrize("technique, edit, message", [
    ("ptq", _set(".weight_scale", lambda t: t.reshape(1, -1).contiguous()), r"weight_scale' .* has shape \[1, 16\], "
                                                                            r"expected \[16, 1\]"),
    ("ptq", _set(".weight_scale", lambda t: t[:1].contiguous()), r"has shape \[1, 1\], expected \[16, 1\]"),
    ("ptq", _set(".weight_scale", lambda t: t.to(torch.int32)), r"is int32, expected float"),
    ("ptq", _set(".codes", lambda t: t.float()), r"codes' .* is float32, expected int8"),
    ("ptq", _set(".act_zero_point", lambda t: t.float()), r"act_zero_point' .* is float32, expected int"),
    ("ptq", _set(".act_scale", lambda t: t.repeat(1, 4)), r"act_scale' .* has shape \[1, 4\], expected \[1, 1\]"),
    ("ptq", lambda t: t.update(extra=torch.zeros(3)), r"holds 1 tensors the 'ptq' config does not use .*'extra'"),
    ("prune", _set(".values", lambda t: t.to(torch.int32)), r"values' .* is int32, expected float"),
    ("prune", _set(".values", lambda t: t[:-1].contiguous()), r"values' .* has shape"),
    ("prune", _set(".mask", lambda t: t[:-1].contiguous()), r"mask' .* has shape"),
    ("prune", _set(".mask", lambda t: t.float()), r"mask' .* is float32, expected uint8"),
    ("ptq", _set(".weight_scale", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
     r"weight_scale' .* holds 1 scales that are not nonnegative finite numbers \(e.g. nan\)"),
    ("ptq", _set(".weight_scale", lambda t: -t), r"weight_scale' .* holds 16 scales that are not nonnegative"),
    ("ptq", _set(".act_scale", lambda t: t * 0), r"act_scale' .* holds 1 scales that are not positive"),
    ("ptq", _set(".act_scale", lambda t: t + float("inf")), r"act_scale' .* not positive finite numbers \(e.g. inf"),
    ("ptq", _set(".act_zero_point", lambda t: t + 1000), r"act_zero_point' .* outside the format's \[0, 255\]"),
    ("prune", _set(".values", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
     r"values' .* holds 1 NaN or infinite values"),
    ("structured", _set("attn1.to_q.weight", lambda t: t[:-2].contiguous()),
     r"leaves attention '.*attn1' with widths .*to_q': 10.* expected 6 heads x 2 = 12"),
    ("structured", _set("ff.net.0.proj.weight", lambda t: t[:-1].contiguous()),
     r"\.ff\.net\.0\.proj\.bias' .* has shape"),
    ("structured", _set("ff.net.2.weight", lambda t: t[:, :-1].contiguous()),
     r"leaves feed-forward '.*' with widths"),
    ("structured", _set("attn1.to_out.0.bias", lambda t: t + float("inf")), r"holds 16 NaN or infinite values"),
], ids=["scale-transposed", "scale-broadcast", "scale-int", "codes-float", "zero-float", "act-scale-wide", "extra",
        "values-int", "values-short", "mask-short", "mask-float", "scale-nan", "scale-negative", "act-scale-zero",
        "act-scale-inf", "zero-point-range", "values-nan", "to-q-narrower", "geglu-short", "ff-out-narrower",
        "bias-inf"])
def test_technique_tensors_of_another_shape_or_dtype_are_refused(saved_artifacts, tmp_path, technique, edit,
                                                                 message):
    """They loaded silently when they broadcast or cast, and the images changed (0.07-0.26)."""
    import shutil
    from safetensors.torch import save_file

    folder = shutil.copytree(saved_artifacts[technique], tmp_path / "edited")
    path = folder / f"00-{'prune' if technique == 'structured' else technique}.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    base = build_tiny("sd")
    unet_before, state_before = base.unet, {k: v.clone() for k, v in base.unet.state_dict().items()}
    with pytest.raises(artifact.ArtifactError, match=message):
        artifact.load(base, folder)
    assert base.unet is unet_before and artifact.applied_techniques(base) == []
    assert all(torch.equal(value, state_before[key]) for key, value in base.unet.state_dict().items())


def _first_heads(count):
    def edit(config):
        heads = config["record"]["heads"]
        heads[next(iter(heads))] = count
    return edit


@pytest.mark.parametrize("technique, edit, message", [
    ("structured", _first_heads(5), r"leaves attention .* expected 5 heads x 2 = 10"),
    ("structured", _first_heads(1), r"expected 1 heads x 2 = 2"),
    ("structured", _first_heads("banana"), r"'banana' heads; a head count is an integer >= 1"),
    ("structured", _first_heads(0), r"0 heads; a head count is an integer >= 1"),
    ("prune", lambda config: config["record"]["masked"].append("no.such.layer"),
     r"record.masked and its restored layers differ on \['no.such.layer'\]"),
    ("prune", lambda config: config["record"]["masked"].remove(next(iter(config["masked_shapes"]))),
     r"record.masked and its restored layers differ on \['"),
], ids=["heads-5", "heads-1", "heads-text", "heads-0", "masked-unknown", "masked-dropped"])
def test_edited_prune_records_are_refused_and_nothing_changes(saved_artifacts, tmp_path, technique, edit, message):
    """Head counts went onto the attention unchecked (1-4 or 12 of 6 loaded and ran heads of the wrong width;
    0, 5 or text failed at the first call), and record.masked names failed only at the next save."""
    import shutil

    folder = shutil.copytree(saved_artifacts[technique], tmp_path / "edited")
    _edit_manifest(folder, lambda m: edit(m["techniques"][0]["config"]))
    base = build_tiny("sd")
    unet_before, heads_before = base.unet, [m.heads for m in base.unet.modules() if hasattr(m, "heads")]
    with pytest.raises(artifact.ArtifactError, match=message):
        artifact.load(base, folder)
    assert base.unet is unet_before and artifact.applied_techniques(base) == []
    assert heads_before == [m.heads for m in base.unet.modules() if hasattr(m, "heads")]


def test_a_flux_single_stream_proj_out_of_the_wrong_width_is_refused(tmp_path):
    """Flux's single-stream proj_out reads cat([attention, MLP hidden]): neither the attention check (it has no
    to_out) nor the FFN check (an offset) covered it, and a column short loaded, then failed at the first call."""
    import diffusion_accel as da
    from safetensors.torch import save_file

    pipe = build_tiny("flux")
    da.prune_(pipe, da.PruneConfig(method="magnitude", sparsity=0.3, pattern="structured"))
    artifact.save(pipe, tmp_path)
    artifact.load(build_tiny("flux"), tmp_path)  # the artifact as saved loads
    tensors = load_file(tmp_path / "00-prune.safetensors")
    name = "single_transformer_blocks.0.proj_out.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, tmp_path / "00-prune.safetensors")
    with pytest.raises(artifact.ArtifactError, match=r"leaves feed-forward 'single_transformer_blocks.0' with widths"):
        artifact.load(build_tiny("flux"), tmp_path)


def test_int8_codes_under_a_manifest_saying_int4_are_refused(saved_artifacts, tmp_path):
    import shutil

    folder = shutil.copytree(saved_artifacts["ptq"], tmp_path / "edited")
    _edit_manifest(folder, lambda m: m["techniques"][0]["config"]["ptq_config"].update(weights="int4"))
    with pytest.raises(artifact.ArtifactError, match=r"codes' .* holds values in \[-\d+, \d+\], outside the "
                                                     r"format's \[-8, 7\]"):
        artifact.load(build_tiny("sd"), folder)

@pytest.mark.parametrize("technique", ["ptq", "structured"])
def test_an_artifact_loaded_under_inference_mode_gives_a_pipeline_that_takes_later_techniques(saved_artifacts,
                                                                                             technique):
    """load() deep-copied the denoiser under the caller's inference_mode: every weight became an inference tensor,
    so a later load_state_dict failed and quantize_ stacked on a loaded structured-pruned pipeline raised
    "abs(): functions with out=... don't support automatic differentiation" (session 47)."""
    import diffusion_accel as da

    pipe = build_tiny("sd")
    with torch.inference_mode():
        artifact.load(pipe, saved_artifacts[technique])
    assert not any(tensor.is_inference() for tensor in pipe.unet.state_dict().values())
    pipe.unet.conv_in.load_state_dict({k: v.clone() for k, v in pipe.unet.conv_in.state_dict().items()})
    if technique == "structured":
        da.quantize_(pipe, da.PTQConfig(calib_prompts=1, calib_num_steps=2, calib_steps="all"))
        assert artifact.applied_techniques(pipe) == ["prune", "ptq"]


def _split_layer(config):
    """The manifest entry of the first layer quantized with split-shortcut (two activation segments)."""
    return next(entry for entry in config["layers"].values() if entry["act"] and len(entry["act"]["segments"]) == 2)


@pytest.mark.parametrize("edit, message", [
    (lambda config: next(iter(config["layers"].values())).update(lowered=1),
     r"lowered must be a kernel name or null, got 1"),
    (lambda config: config.update(num_steps=-1), r"num_steps must be an integer >= 1, got -1"),
    (lambda config: config["layers"].update({"no.such.layer": next(iter(config["layers"].values()))}),
     r"AttributeError: .*no attribute `no`"),
    (lambda config: next(e for e in config["layers"].values() if e["act"])["act"].update(mode="Dynamic"),
     r"act mode must be one of \('static', 'dynamic'\), got 'Dynamic'"),
    (lambda config: _split_layer(config)["act"].update(segments=[10, 10]),
     r"act segments \[10, 10\] must be positive channel counts summing to the base layer's \d+ input channels"),
    (lambda config: _split_layer(config)["act"].update(segments=[-1, 1]), r"act segments \[-1, 1\] must be positive"),
    (lambda config: _split_layer(config).update(segments=[-1, 1 + sum(_split_layer(config)["segments"])]),
     r"segments \[-1, \d+\] must be positive column counts summing to the base layer's \d+ weight columns"),
], ids=["lowered-truthy", "num-steps", "unknown-layer", "act-mode", "act-segments-short", "act-segments-negative",
        "weight-segments-negative"])
def test_mistyped_ptq_manifest_fields_are_refused(saved_artifacts, tmp_path, edit, message):
    """Any truthy 'lowered' (1, a list) was taken as lowered, num_steps -1 loaded, and an unknown layer name ended in a
    bare AttributeError traceback. Act segments not covering the layer's input channels loaded and every call then
    failed in the split (session 47)."""
    import shutil

    folder = shutil.copytree(saved_artifacts["ptq"], tmp_path / "edited")
    _edit_manifest(folder, lambda m: edit(m["techniques"][0]["config"]))
    base = build_tiny("sd")
    with pytest.raises(artifact.ArtifactError, match=message):
        artifact.load(base, folder)
    assert artifact.applied_techniques(base) == []


def test_a_manifest_listing_the_cache_before_quantization_is_refused(tmp_path):
    """Restoring quantization after the cache bypassed quantize_'s rule that caching comes last."""
    import diffusion_accel as da

    pipe = da.quantize_(build_tiny("sd"), da.PTQConfig(calib_prompts=1, calib_num_steps=2, calib_steps="all"))
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    artifact.save(pipe, tmp_path)
    _edit_manifest(tmp_path, lambda m: m["techniques"].reverse())
    base = build_tiny("sd")
    with pytest.raises(artifact.ArtifactError, match=r"'ptq' cannot be restored .*a feature cache is enabled"):
        artifact.load(base, tmp_path)
    assert artifact.applied_techniques(base) == []


def test_mark_applied_needs_a_registered_technique():
    with pytest.raises(ValueError, match="no save/load handler"):
        artifact.mark_applied(build_tiny("sd"), "unknown")


def test_all_three_techniques_stack_save_and_reload_bit_exactly(tmp_path):
    """Prune, then quantize (lowered: layers replaced), then cache: save needs each technique's
    state as it was applied, and load reproduces the stacked pipeline's images exactly."""
    import diffusion_accel as da

    pipe = build_tiny("sd")
    calib = da.calibrate(pipe, ["a cat", "a dog"], num_inference_steps=4, progress=False)
    da.prune_(pipe, da.PruneConfig(method="obs", sparsity=0.5, pattern="2:4"), calib=calib)
    da.quantize_(pipe, da.PTQConfig.preset("w8a8"), calib=calib)
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2, branch=0))
    artifact.save(pipe, tmp_path)
    loaded = artifact.load(build_tiny("sd"), tmp_path)
    assert artifact.applied_techniques(loaded) == ["prune", "ptq", "cache"]
    kwargs = dict(tiny_call_kwargs("sd", steps=4))
    expected = pipe(**kwargs).images
    assert torch.equal(loaded(**tiny_call_kwargs("sd", steps=4)).images, expected)


@pytest.mark.parametrize("prune_config", [dict(method="wanda", sparsity=0.5), dict(method="obs", sparsity=0.3,
                                                                                     pattern="structured")],
                         ids=["unstructured", "structured"])
def test_quantizing_a_pruned_pipeline_frees_the_pruned_float_weights_it_replaced(tmp_path, prune_config):
    """The prune export, taken when pruning ended, kept every pruned layer's float weights alive under the
    int8 codes that replaced them (fashion-sd: 0.5x the fp32 UNet; on the GPU for a GPU pipeline); now it
    keeps masks and shapes of the layers quantization replaced, and the artifact still reloads exactly."""
    import diffusion_accel as da

    pipe = build_tiny("sd")
    calib = da.calibrate(pipe, ["a cat", "a dog"], num_inference_steps=3, progress=False)
    da.prune_(pipe, da.PruneConfig(**prune_config), calib=calib)
    da.quantize_(pipe, da.PTQConfig.preset("w8a8", exclude=("*.ff.net.2",)), calib=calib)
    config, tensors = pipe.unet._diffusion_accel_exports["prune"]
    kept_floats = [name for name in tensors if name.endswith((".values", ".weight"))]
    assert config["superseded"] and config["superseded_by"] == "ptq"
    assert all(".ff.net.2" in name for name in kept_floats), kept_floats  # only layers left in float
    artifact.save(pipe, tmp_path)
    loaded = artifact.load(build_tiny("sd"), tmp_path)
    assert torch.equal(_images(loaded), _images(pipe))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    edited = copy.deepcopy(manifest)  # the quantization no longer covers one replaced layer: it loaded all zeros
    left_out = config["superseded"][0]
    del edited["techniques"][1]["config"]["layers"][left_out]
    (tmp_path / "manifest.json").write_text(json.dumps(edited))
    ptq_file = tmp_path / edited["techniques"][1]["tensors"]
    save_file({name: t for name, t in load_file(ptq_file).items() if not name.startswith(f"{left_out}.")}, ptq_file)
    with pytest.raises(artifact.ArtifactError, match=f"left layer '{left_out}' to 'ptq', which did not restore it"):
        artifact.load(build_tiny("sd"), tmp_path)
    manifest["techniques"] = manifest["techniques"][:1]  # the quantization that replaces them, cut off
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(artifact.ArtifactError, match="no 'ptq' follows in the manifest"):
        artifact.load(build_tiny("sd"), tmp_path)


@pytest.mark.parametrize("prune_config", [dict(method="obs", sparsity=0.5), dict(method="magnitude", sparsity=0.5,
                                                                                  pattern="structured")],
                         ids=["obs", "structured"])
def test_activation_only_quantization_keeps_the_pruned_weights_it_computes_with(tmp_path, prune_config):
    """Quantizing only activations (weights=None) wraps the pruned float weights without storing them: the
    prune export must keep them (it dropped them, and the reload ran zeroed or unpruned-base weights)."""
    import diffusion_accel as da

    pipe = build_tiny("sd")
    calib = da.calibrate(pipe, ["a cat", "a dog"], num_inference_steps=3, progress=False)
    da.prune_(pipe, da.PruneConfig(**prune_config), calib=calib)
    da.quantize_(pipe, da.PTQConfig(weights=None, activations="int8", act_mode="dynamic", lower=False))
    assert not pipe.unet._diffusion_accel_exports["prune"][0].get("superseded")
    artifact.save(pipe, tmp_path)
    loaded = artifact.load(build_tiny("sd"), tmp_path)
    assert torch.equal(_images(loaded), _images(pipe))


@pytest.mark.parametrize("groups", [-2, 6.0, True, "6"])
def test_a_resized_group_norms_group_count_is_checked_on_load(tmp_path, groups):
    """record.norm_groups -2 / 6.0 / true loaded, and every call then failed inside torch's group_norm (session 49)."""
    import diffusion_accel as da

    pipe = da.prune_(build_tiny("sd"), da.PruneConfig(method="magnitude", sparsity=0.3, pattern="structured",
                                                     prune_resnets=True))
    artifact.save(pipe, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    norm_groups = manifest["techniques"][0]["config"]["record"]["norm_groups"]
    name = next(iter(norm_groups))
    norm_groups[name] = groups
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(artifact.ArtifactError, match=f"gives GroupNorm '{name}' .* groups; a group count is an integer"):
        artifact.load(build_tiny("sd"), tmp_path)


def test_a_tilde_after_the_plus_of_base_and_artifact_is_the_home_folder(tmp_path, monkeypatch):
    """The shell expands no ~ after '+': 'tiny:sd+~/art' was refused as not an artifact until session 41."""
    from diffusion_accel.loading import load_pipeline

    monkeypatch.setenv("HOME", str(tmp_path))
    artifact.save(_scaled_pipe(pipe=load_pipeline("tiny:sd")), tmp_path / "art")
    assert artifact.applied_techniques(load_pipeline("tiny:sd+~/art")) == ["test-scale"]


def test_save_and_load_expand_a_tilde(tmp_path, monkeypatch):
    """da.save(pipe, "~/art") made a folder named "~" in the working directory, and da.load(pipe, "~/art") found no
    manifest there (pipeline specs and zoo.load expanded it)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert artifact.save(_scaled_pipe(), "~/art") == tmp_path / "home" / "art"
    assert not (tmp_path / "~").exists() and (tmp_path / "home" / "art" / "manifest.json").is_file()
    assert artifact.applied_techniques(artifact.load(build_tiny("sd"), "~/art")) == ["test-scale"]


def test_an_artifact_whose_folder_name_holds_a_plus_and_path_specs_load(tmp_path):
    """'BASE+/x/obs+cache' split at the last '+' ('cache': not an artifact); a pathlib.Path spec was refused as
    'empty'."""
    from diffusion_accel.loading import load_pipeline

    artifact.save(_scaled_pipe(pipe=load_pipeline("tiny:sd")), tmp_path / "obs+cache")
    assert artifact.applied_techniques(load_pipeline(f"tiny:sd+{tmp_path / 'obs+cache'}")) == ["test-scale"]
    assert artifact.applied_techniques(load_pipeline(tmp_path / "obs+cache")) == ["test-scale"]
    with pytest.raises(FileNotFoundError, match="'missing' after '\\+' is not an artifact folder"):
        load_pipeline(f"tiny:sd+{tmp_path / 'obs+cache'}+missing")


def test_an_artifact_folder_is_a_pipeline_spec_that_loads_its_recorded_base(tmp_path):
    from diffusion_accel.loading import load_pipeline

    accelerated = _scaled_pipe(pipe=load_pipeline("tiny:sd"))
    artifact.save(accelerated, tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["base"]["source"] == {"spec": "tiny:sd", "dtype": None}
    for spec in (str(tmp_path / "art"), f"tiny:sd+{tmp_path / 'art'}"):
        loaded = load_pipeline(spec)
        assert artifact.applied_techniques(loaded) == ["test-scale"]
        assert torch.equal(_images(loaded), _images(accelerated))
    with pytest.warns(UserWarning, match="saved from a float32 unet; this base's unet is bfloat16"):
        in_bf16 = load_pipeline(str(tmp_path / "art"), dtype="bf16")  # the base is cast before the artifact applies
    assert in_bf16.unet.dtype == torch.bfloat16 and artifact.applied_techniques(in_bf16) == ["test-scale"]


def test_a_pipeline_cast_before_saving_reloads_in_its_dtype(tmp_path):
    """The manifest records the dtype the denoiser computed in: the artifact spec loads its base in it
    (bit for bit), and da.load onto a base in another dtype warns that the images will differ."""
    import diffusion_accel as da
    from diffusion_accel.loading import load_pipeline

    config = da.PTQConfig(calib_prompts=1, calib_num_steps=2, calib_steps="all")
    pipe = da.quantize_(load_pipeline("tiny:sd"), config).to(torch.bfloat16)
    artifact.save(pipe, tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["base"]["dtype"] == "bfloat16"
    loaded = load_pipeline(str(tmp_path))
    assert loaded.unet.dtype == torch.bfloat16 and torch.equal(_images(loaded), _images(pipe))
    with pytest.warns(UserWarning, match="saved from a bfloat16 unet; this base's unet is float32"):
        artifact.load(build_tiny("sd"), tmp_path)


@pytest.mark.parametrize("made_in, cast_to", [("bfloat16", torch.float32), ("bfloat16", torch.float16),
                                              ("float16", torch.bfloat16)])
def test_an_artifact_of_a_half_base_cast_after_loads_by_spec_bit_exactly(tmp_path, made_in, cast_to):
    """Techniques applied in bf16, then pipe.to(float32): the spec loaded the base in float32, from weights
    without the bf16 rounding, and the images differed; now it loads the base in bf16 and casts after. Casts
    between the two half precisions were not recorded until session 44 (max |diff| 0.005-0.09, no warning)."""
    import diffusion_accel as da
    from diffusion_accel.loading import load_pipeline

    pipe = load_pipeline("tiny:sd", dtype=made_in)
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2, branch=0))
    pipe.to(cast_to)
    artifact.save(pipe, tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["base"]["rounded_to"] == made_in
    for asked in (None, cast_to):  # the recorded dtype asked for (one --dtype for every CLI variant) was loaded
        with warnings.catch_warnings():  # in it, without the rounding: other images (0.046 off, session 47)
            warnings.simplefilter("error")
            loaded = load_pipeline(str(tmp_path), dtype=asked)
        assert loaded.unet.dtype == cast_to and torch.equal(_images(loaded), _images(pipe))


def test_a_float64_pipeline_reloads_by_spec(tmp_path):
    from diffusion_accel.loading import load_pipeline

    accelerated = _scaled_pipe(pipe=load_pipeline("tiny:sd", dtype="float64"))
    artifact.save(accelerated, tmp_path)
    loaded = load_pipeline(str(tmp_path))
    assert loaded.unet.dtype == torch.float64 and torch.equal(_images(loaded), _images(accelerated))


def test_loading_where_other_kernels_lower_the_layers_warns(tmp_path, monkeypatch):
    """Kernels follow the device the base is on: a host without them (no VNNI here) lowers to others, whose images
    differ slightly from the saved pipeline's; load says so."""
    import diffusion_accel as da
    from diffusion_accel.quant import lower as lower_module

    pipe = da.quantize_(build_tiny("sd"), da.PTQConfig(weights="int8", activations="int8", act_mode="dynamic"))
    artifact.save(pipe, tmp_path)
    assert any(hasattr(module, "kind") for module in pipe.unet.modules())  # lowered here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        artifact.load(build_tiny("sd"), tmp_path)  # the same host: no warning
    monkeypatch.setattr(lower_module, "LOWERINGS", {})  # a device with no lowering at all
    with pytest.warns(UserWarning, match=r"other kernels than the saved pipeline ran \(.*-> simulated"):
        artifact.load(build_tiny("sd"), tmp_path)


def test_artifact_specs_that_cannot_work_are_clear_errors(tmp_path):
    from diffusion_accel.loading import load_pipeline

    artifact.save(_scaled_pipe(), tmp_path / "built_in_code")  # no spec to record
    with pytest.raises(artifact.ArtifactError, match=r"does not record.*BASE\+"):
        load_pipeline(str(tmp_path / "built_in_code"))
    with pytest.raises(FileNotFoundError, match="not an artifact folder"):
        load_pipeline(f"tiny:sd+{tmp_path / 'missing'}")
    with pytest.raises(artifact.ArtifactError, match="itself an artifact"):
        load_pipeline(f"{tmp_path / 'built_in_code'}+{tmp_path / 'built_in_code'}")
    with pytest.raises(artifact.ArtifactError, match="different base model"):
        load_pipeline(f"tiny:dit+{tmp_path / 'built_in_code'}")


def test_pipelines_loaded_by_diffusers_record_their_folder(tmp_path):
    from diffusers import DiffusionPipeline

    build_tiny("sd").save_pretrained(tmp_path / "sd")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert artifact.pipeline_source(pipe) == {"spec": str(tmp_path / "sd"), "dtype": None}
    assert artifact.pipeline_source(build_tiny("sd")) is None


def test_load_onto_a_compiled_base_warns_and_a_failed_one_keeps_the_wrapper(tmp_path):
    """load() applies to a copy of the module inside torch.compile's wrapper: say so on success (the
    wrapper is gone); on failure put back the wrapper itself (it used to put back the bare module)."""
    artifact.save(_scaled_pipe(), tmp_path / "good")
    base = build_tiny("sd")
    base.unet = torch.compile(base.unet)
    with pytest.warns(UserWarning, match=r"replaced the compiled pipe.unet .* not compiled; compile it again"):
        artifact.load(base, tmp_path / "good")
    assert artifact.applied_techniques(base) == ["test-scale"]
    from diffusion_accel.eval import compile_denoiser

    for regional in (False, True):  # compiled in place (module.compile()): the copy dropped it without a word
        base = build_tiny("sd")
        compile_denoiser(base, regional=regional)
        with pytest.warns(UserWarning, match=r"replaced the compiled pipe.unet"):
            artifact.load(base, tmp_path / "good")
    artifact.save(_scaled_pipe(factor=-1.0), tmp_path / "bad")
    base = build_tiny("sd")
    wrapper = base.unet = torch.compile(base.unet)
    with pytest.raises(artifact.ArtifactError, match="on purpose"):
        artifact.load(base, tmp_path / "bad")
    assert base.unet is wrapper


def test_saving_over_an_artifact_removes_the_files_only_the_old_one_listed(tmp_path):
    stale = _scaled_pipe()
    artifact.save(stale, tmp_path)
    (tmp_path / "00-test-scale.safetensors").rename(tmp_path / "07-old.safetensors")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["techniques"][0]["tensors"] = "07-old.safetensors"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "notes.txt").write_text("mine")  # not listed by the old manifest: kept
    artifact.save(_scaled_pipe(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-test-scale.safetensors", "base-sample.safetensors",
                                                          "manifest.json", "notes.txt"]


def test_saving_over_an_edited_manifest_deletes_only_technique_files(tmp_path):
    """An old manifest listing "manifest.json" or "../notes.txt" as technique files had save delete the manifest it
    had just written (the folder then read as an interrupted save) and the user's notes.txt (until session 49)."""
    artifact.save(_scaled_pipe(), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["techniques"] += [{"name": "x", "config": {}, "tensors": "manifest.json"},
                               {"name": "y", "config": {}, "tensors": "../notes.txt"}]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "notes.txt").write_text("mine")
    artifact.save(_scaled_pipe(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-test-scale.safetensors", "base-sample.safetensors",
                                                          "manifest.json", "notes.txt"]
    assert artifact.applied_techniques(artifact.load(build_tiny("sd"), tmp_path)) == ["test-scale"]


@pytest.mark.parametrize("saved_dtype, loaded_dtype", [
    (torch.float32, torch.float16), (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
    (torch.float16, torch.float16), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_the_same_base_in_another_float_dtype_is_recognised(tmp_path, saved_dtype, loaded_dtype):
    """The bf16-rounded fingerprint never matched a float16 copy (double rounding); the weight sample does.
    float16 vs bfloat16 (an fp16 recipe's artifact on a bf16 pipeline) was refused as another model."""
    pipe = build_tiny("sd").to(saved_dtype)
    artifact.save(_scaled_pipe(pipe=pipe), tmp_path)
    base = build_tiny("sd").to(loaded_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dtype-change warning (tested above)
        assert artifact.applied_techniques(artifact.load(base, tmp_path)) == ["test-scale"]


@pytest.mark.parametrize("saved_route, loaded_route", [
    ((torch.float16, torch.bfloat16), (torch.float32,)), ((torch.float16, torch.bfloat16), (torch.bfloat16,)),
    ((torch.bfloat16,), (torch.float16, torch.bfloat16)), ((torch.float32,), (torch.float16, torch.bfloat16)),
    ((torch.float16, torch.float32), (torch.bfloat16,))])
def test_the_same_base_rounded_along_another_path_is_recognised(tmp_path, saved_route, loaded_route):
    """fp16 variant files loaded in bf16 (the sd15 / sdxl recipes' variant with --dtype bf16) round the weights
    twice: such an artifact was refused as "a different base model" on the model loaded from its fp32 files."""
    def routed(dtypes):
        pipe = build_tiny("sd")
        for dtype in dtypes:
            pipe.to(dtype)
        return pipe

    artifact.save(_scaled_pipe(pipe=routed(saved_route)), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dtype-change warning (tested above)
        assert artifact.applied_techniques(artifact.load(routed(loaded_route), tmp_path)) == ["test-scale"]


def test_another_model_in_float16_is_still_refused(tmp_path):
    artifact.save(_scaled_pipe(), tmp_path)
    fine_tuned = build_tiny("sd")
    with torch.no_grad():
        fine_tuned.unet.conv_out.bias.add_(1e-3)  # a small change: same architecture, other weights
    for base in (fine_tuned.to(torch.float16), build_tiny("sd", seed=1).to(torch.float16)):
        with pytest.raises(artifact.ArtifactError, match="different base model"):
            artifact.load(base, tmp_path)
    artifact.save(_scaled_pipe(pipe=build_tiny("sd").to(torch.float16)), tmp_path)
    for base in (copy.deepcopy(fine_tuned).to(torch.bfloat16), build_tiny("sd", seed=1).to(torch.bfloat16)):
        with pytest.raises(artifact.ArtifactError, match="different base model"):
            artifact.load(base, tmp_path)
    assert artifact.applied_techniques(fine_tuned) == []


def test_the_base_sample_is_taken_before_a_technique_changes_the_weights(tmp_path):
    artifact.save(_scaled_pipe(factor=3.0), tmp_path)  # conv_in.weight scaled after the sample
    sample = load_file(str(tmp_path / "base-sample.safetensors"))
    untouched = weight_sample(build_tiny("sd").unet)
    assert sample.keys() == untouched.keys() and torch.equal(sample["conv_in.weight"], untouched["conv_in.weight"])


def test_a_config_json_cannot_hold_fails_before_any_file_is_written(tmp_path, monkeypatch):
    """A non-JSON value in a technique's config (a numpy int in calib_kwargs, before PruneConfig checked
    them) failed after the tensor files were written, leaving them without a manifest."""
    import dataclasses

    import numpy as np

    import diffusion_accel as da

    pipe = da.prune_(build_tiny("sd"), da.PruneConfig(method="magnitude", sparsity=0.3))
    handler = artifact._HANDLERS["prune"]
    monkeypatch.setitem(artifact._HANDLERS, "prune", dataclasses.replace(
        handler, export=lambda p: ({"calib_kwargs": {"height": np.int64(32)}}, handler.export(p)[1])))
    monkeypatch.delattr(pipe.unet, artifact._EXPORTS_ATTR, raising=False)
    with pytest.raises(artifact.ArtifactError, match="'prune' config holds a value JSON cannot store"):
        da.save(pipe, tmp_path / "art")
    assert not (tmp_path / "art").exists() or not any((tmp_path / "art").iterdir())


def test_the_base_fingerprint_follows_weight_changes_until_a_technique_is_applied(tmp_path):
    """A fingerprint taken by a failed quantize_ (or a removed cache) was kept: after the weights changed
    (a merged LoRA) the artifact named the old weights as its base, so the right base was refused and
    the old one accepted."""
    import diffusion_accel as da

    pipe = build_tiny("sd")
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    da.remove_cache(pipe)
    with torch.no_grad():
        for parameter in pipe.unet.parameters():
            parameter.mul_(1.01)
    da.prune_(pipe, da.PruneConfig(method="magnitude", sparsity=0.3))
    da.save(pipe, tmp_path / "art")
    changed = build_tiny("sd")
    with torch.no_grad():
        for parameter in changed.unet.parameters():
            parameter.mul_(1.01)
    da.load(changed, tmp_path / "art")
    with pytest.raises(artifact.ArtifactError, match="different base model"):
        da.load(build_tiny("sd"), tmp_path / "art")


def test_variant_weight_files_load_and_an_artifact_records_them(tmp_path):
    """Folders and hub models with only fp16-variant files could not load (no variant option)."""
    import diffusion_accel as da
    from diffusion_accel.loading import load_pipeline

    build_tiny("sd").save_pretrained(tmp_path / "model", variant="fp16")
    with pytest.raises(OSError):
        load_pipeline(str(tmp_path / "model"))
    pipe = load_pipeline(str(tmp_path / "model"), variant="fp16")
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    da.save(pipe, tmp_path / "artifact")
    assert json.loads((tmp_path / "artifact" / "manifest.json").read_text())["base"]["source"]["variant"] == "fp16"
    loaded = load_pipeline(str(tmp_path / "artifact"))  # the base from the recorded variant's files
    assert artifact.applied_techniques(loaded) == ["cache"]
    assert torch.equal(loaded(**tiny_call_kwargs("sd")).images, pipe(**tiny_call_kwargs("sd")).images)
    with pytest.raises(ValueError, match="selects weight files of a hub model or save_pretrained folder"):
        load_pipeline("tiny:sd", variant="fp16")
    # another base named explicitly takes its own default files, not the recorded variant (both failed)
    build_tiny("sd").save_pretrained(tmp_path / "plain")
    for base in ("tiny:sd", str(tmp_path / "plain")):
        assert artifact.applied_techniques(load_pipeline(f"{base}+{tmp_path / 'artifact'}")) == ["cache"]
    relative = os.path.relpath(tmp_path / "model")  # the recorded base under another spelling keeps its variant
    assert artifact.applied_techniques(load_pipeline(f"{relative}+{tmp_path / 'artifact'}")) == ["cache"]


def test_an_empty_variant_asks_for_the_standard_files_also_under_an_artifact(tmp_path, capsys):
    """variant '' was refused ('must be a weight-file variant name') by every command but calibrate, and an
    artifact whose base recorded fp16 files could not be loaded from the standard ones (session 48 review)."""
    import diffusion_accel as da
    from diffusion_accel.cli import main
    from diffusion_accel.loading import load_pipeline

    model = tmp_path / "model"
    build_tiny("sd").save_pretrained(model, variant="fp16")
    pipe = load_pipeline(str(model), variant="fp16")
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    da.save(pipe, tmp_path / "artifact")
    build_tiny("sd").save_pretrained(model)  # the standard files in place of the fp16 ones
    for variant_file in model.glob("*/*.fp16.*"):
        variant_file.unlink()
    with pytest.raises(ValueError, match="variant=fp16"):
        load_pipeline(str(tmp_path / "artifact"))  # the recorded fp16 files
    loaded = load_pipeline(str(tmp_path / "artifact"), variant="")
    assert artifact.applied_techniques(loaded) == ["cache"] and "variant" not in artifact.pipeline_source(loaded)
    with pytest.raises(ValueError, match="'' for the standard files"):
        load_pipeline(str(model), variant="a/b")
    assert main(["eval", "--pipe", f"base={model}", "--variant", "", "--steps", "2", "--num-prompts", "1",
                 "--metrics", "latency", "--out", str(tmp_path / "report")]) == 0


def test_weight_samples_of_tensors_past_two_to_the_24_elements_stay_in_bounds():
    """float32 sample positions rounded past the end of a 29,491,200-weight conv (full-size SD 1.5):
    every technique failed with IndexError before doing anything."""
    from torch import nn

    big = nn.Linear(1, 1)
    big.weight = nn.Parameter(torch.zeros(29_491_200, 1))  # an SD 1.5 up-block conv1's element count
    sample = weight_sample(big)["weight"]
    assert sample.numel() == 16 and bool((sample == 0).all())


@pytest.mark.parametrize("interrupted_call", [0, 1, 2])
def test_a_save_interrupted_over_an_artifact_never_leaves_a_mixed_one(tmp_path, monkeypatch, interrupted_call):
    """Files were overwritten in place and the manifest written last: Ctrl-C in between left the old manifest
    over the new tensors, which load accepted (images of one run, provenance of another). Interrupted at each
    rename, the folder now loads as the old artifact, is refused naming the interrupted save, or is the new."""
    import os

    old = _scaled_pipe(2.0)
    artifact.save(old, tmp_path)
    new = _scaled_pipe(3.0)
    calls, real_replace = [0], os.replace

    def replace(source, target):
        calls[0] += 1
        if calls[0] > interrupted_call:
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        artifact.save(new, tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    try:
        loaded = artifact.load(build_tiny("sd"), tmp_path)
    except artifact.ArtifactError as error:
        assert "a save into it was interrupted" in str(error)
        artifact.save(new, tmp_path)  # saving again repairs it and removes the staging files
        assert not list(tmp_path.glob(".*"))
        loaded = artifact.load(build_tiny("sd"), tmp_path)
    assert loaded.unet._test_scale in (2.0, 3.0)
    assert torch.equal(_images(loaded), _images(old if loaded.unet._test_scale == 2.0 else new))


def test_saving_again_after_a_save_interrupted_in_its_commit_removes_the_old_artifacts_files(tmp_path):
    """With the old manifest already removed nothing listed the old technique files: they stayed for good."""
    artifact.save(_scaled_pipe(), tmp_path)
    (tmp_path / "00-test-scale.safetensors").rename(tmp_path / "07-old.safetensors")  # another stack's file
    (tmp_path / "manifest.json").unlink()  # the commit removed the old manifest, then was interrupted
    (tmp_path / "notes.txt").write_text("mine")
    artifact.save(_scaled_pipe(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-test-scale.safetensors", "base-sample.safetensors",
                                                          "manifest.json", "notes.txt"]


def test_load_refuses_bases_whose_hooks_a_copy_cannot_take_before_changing_anything(tmp_path):
    """A layerwise-cast base loaded any artifact and then failed at every call (the copy ran the original's
    float8 closures), group offloading ended in "cannot pickle 'module' object", diffusers' own cache was
    called a damaged artifact, and an unmerged LoRA a different base model."""
    import diffusion_accel as da
    from diffusers import FirstBlockCacheConfig
    from peft import LoraConfig

    cached, pruned = tmp_path / "cached", tmp_path / "pruned"
    da.save(da.enable_cache(build_tiny("sd"), da.DeepCacheConfig(interval=2)), cached)
    da.save(da.prune_(build_tiny("sd"), da.PruneConfig(method="magnitude", sparsity=0.5)), pruned)
    flux_pruned = tmp_path / "flux"
    da.save(da.prune_(build_tiny("flux"), da.PruneConfig(method="magnitude", sparsity=0.5)), flux_pruned)

    def layerwise(pipe):
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)

    def group_offload(pipe):
        pipe.unet.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1)

    def lora(pipe):
        pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q"], init_lora_weights=False))

    cases = [("sd", layerwise, cached, "layerwise casting stores in torch.float8_e4m3fn.*enable_layerwise_casting"),
             ("sd", group_offload, cached, "group offloading.*enable_group_offload afterwards"),
             ("sd", lora, pruned, r"cannot apply \['prune'\] to layers that unmerged adapters.*unload_lora_weights"),
             ("flux", lambda pipe: pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05)), flux_pruned,
              r"diffusers' own cache \(FirstBlockCacheConfig.*pipe.transformer.disable_cache\(\), load")]
    for family, hook, folder, message in cases:
        base = build_tiny(family)
        hook(base)
        denoiser = base.unet if family == "sd" else base.transformer
        with pytest.raises(ValueError, match=message):
            artifact.load(base, folder)
        assert (base.unet if family == "sd" else base.transformer) is denoiser
        assert artifact.applied_techniques(base) == []
    with_lora = build_tiny("sd")
    lora(with_lora)
    artifact.load(with_lora, cached)  # a cache changes no weights: it runs with the adapters
    assert artifact.applied_techniques(with_lora) == ["cache"]


def test_save_refuses_weights_that_diffusers_hooks_hold_in_another_form(tmp_path):
    """Under layerwise casting save recorded base.dtype 'float8_e4m3fn', and every load of the artifact failed as
    "damaged" (until session 50); under group offloading to disk the weights are placeholders between calls."""
    import diffusion_accel as da

    cast = da.enable_cache(build_tiny("sd"), da.DeepCacheConfig(interval=2))
    cast.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(artifact.ArtifactError, match=r"save: diffusers' layerwise casting stores the unet's weights "
                                                     r"in torch.float8_e4m3fn .*save before enable_layerwise_casting"):
        da.save(cast, tmp_path / "cast")
    assert not (tmp_path / "cast").exists()
    offloaded = da.prune_(build_tiny("sd"), da.PruneConfig(method="magnitude", sparsity=0.5))
    offloaded.unet.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"),
                                        offload_type="leaf_level", offload_to_disk_path=str(tmp_path / "disk"))
    with pytest.raises(artifact.ArtifactError, match=r"group offloading keeps the unet's weights on disk"):
        da.save(offloaded, tmp_path / "offloaded")


def test_fp8_codes_and_timestep_group_bounds_must_be_finite(tmp_path):
    """NaN fp8 weight codes loaded silently (NaN images), and so did NaN or unordered group bounds (every step in
    group 0: other images)."""
    import shutil

    import diffusion_accel as da
    from safetensors.torch import save_file

    fast = {"calib_prompts": 1, "calib_num_steps": 2, "calib_steps": "all"}
    fp8 = artifact.save(da.quantize_(build_tiny("sd"), da.PTQConfig.preset("fp8", activations=None, **fast)),
                        tmp_path / "fp8")
    grouped = da.PTQConfig(timestep_groups=3, **{**fast, "calib_num_steps": 4})
    groups = artifact.save(da.quantize_(build_tiny("sd"), grouped), tmp_path / "groups")
    tensors = load_file(fp8 / "00-ptq.safetensors")
    codes = _first(tensors, ".codes")
    tensors[codes] = tensors[codes].float().index_fill(0, torch.tensor([0]), float("nan")).to(tensors[codes].dtype)
    save_file(tensors, fp8 / "00-ptq.safetensors")
    with pytest.raises(artifact.ArtifactError, match=rf"{codes}' .* holds \d+ NaN or infinite values"):
        artifact.load(build_tiny("sd"), fp8)
    bounds = json.loads((groups / "manifest.json").read_text())["techniques"][0]["config"]["group_bounds"]
    for edited in ([float("nan")] * 2, list(reversed(bounds)) if bounds[0] != bounds[1] else [0, 1], ["1", "2"]):
        folder = shutil.copytree(groups, tmp_path / f"edited{len(list(tmp_path.iterdir()))}")
        _edit_manifest(folder, lambda m: m["techniques"][0]["config"].update(group_bounds=edited))
        with pytest.raises(artifact.ArtifactError, match=r"group_bounds must list .* finite timesteps in descending"):
            artifact.load(build_tiny("sd"), folder)


def test_fingerprints_read_2_4_sparse_weights_densely(monkeypatch):
    """Every tensor has a dequantize method, which torch's 2:4 classes refuse: weight_sample asked it first, so a
    2:4 prune with sparse kernels (GPU) failed in mark_applied and was rolled back, and so did loading its
    artifact."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    from diffusion_accel.base_match import dense

    weight = torch.randn(64, 64, dtype=torch.bfloat16)
    for cls in (SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS):
        sparse = cls(weight.shape, packed=weight.clone(), meta=torch.zeros(1, dtype=torch.int16), packed_t=None,
                     meta_t=None, compressed_swizzled_bitmask=None)  # the class's dispatch table: no device needed
        monkeypatch.setattr(cls, "to_dense", lambda self: weight)  # its kernels need a GPU
        assert dense(torch.nn.Parameter(sparse, requires_grad=False)) is weight


def test_tiny_specs_keep_the_users_random_stream_and_zoo_folders_refuse_a_variant():
    """load_pipeline("tiny:...") re-seeded torch's global RNG (two users' seeds gave the same numbers after it), and
    variant="fp16" on the zoo's own folder loaded its one set of files silently and recorded the variant."""
    from diffusion_accel import zoo
    from diffusion_accel.loading import load_pipeline

    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        load_pipeline("tiny:ddpm")
        draws.append(torch.rand(3))
    assert not torch.equal(*draws)
    with pytest.raises(ValueError, match=r"variant='fp16': .* holds the zoo pipeline fashion-sd"):
        load_pipeline(str(zoo.path("fashion-sd")), variant="fp16")


def test_a_zoo_pipeline_saved_with_a_variant_loads_with_it_and_keeps_its_call_settings(tmp_path):
    """Recognised as the zoo pipeline by its denoiser config, it was refused its variant (session 45's review)."""
    from diffusion_accel import call_defaults, zoo
    from diffusion_accel.loading import load_pipeline

    zoo.load("fashion-sd").save_pretrained(tmp_path, variant="fp16")
    loaded = load_pipeline(str(tmp_path), variant="fp16")
    assert call_defaults(loaded) == zoo.CALL_DEFAULTS["fashion-sd"]
    zoo.load("fashion-sd").save_pretrained(tmp_path / "sharded", variant="fp16", max_shard_size="200KB")
    assert any("fp16-00001-of-" in path.name for path in (tmp_path / "sharded").rglob("*.safetensors"))
    assert call_defaults(load_pipeline(str(tmp_path / "sharded"), variant="fp16")) == zoo.CALL_DEFAULTS["fashion-sd"]
    with pytest.raises(OSError, match="nosuchvariant"):  # fashion-clip loaded its standard files silently
        zoo.load("fashion-clip", variant="nosuchvariant")


def test_loading_onto_a_base_with_fused_projections_names_the_unfuse(tmp_path):
    """The fused to_qkv weights changed the fingerprint: "made for a different base model", on the same model."""
    import diffusion_accel as da

    folder = tmp_path
    da.save(da.enable_cache(build_tiny("flux"), da.BlockCacheConfig(interval=2)), folder)
    base = build_tiny("flux")
    base.transformer.fuse_qkv_projections()
    with pytest.raises(artifact.ArtifactError, match=r"runs fused ones .*pipe.transformer.unfuse_qkv_projections\(\)"):
        da.load(base, folder)
    base.transformer.unfuse_qkv_projections()
    assert artifact.applied_techniques(da.load(base, folder)) == ["cache"]
