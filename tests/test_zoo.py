"""The reference zoo: offline loading and generation, tokenizers, the data loader, a tiny training run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from diffusion_accel import zoo
from diffusion_accel.zoo import _common as C
from diffusion_accel.zoo.captions import all_captions, vocabulary
from diffusion_accel.zoo.data import ENV_VAR, find_root, load_split, to_rgb32
from diffusion_accel.zoo.tokenizer import build_clip_tokenizer, build_t5_tokenizer


def _have_data() -> bool:
    try:
        find_root()
    except FileNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(not _have_data(), reason="Fashion-MNIST (dataset-fashion-mnist) not installed")


def test_path_rejects_unknown_name():
    with pytest.raises(ValueError, match="fashion-sd"):
        zoo.path("stable-diffusion")
    assert set(zoo.names()) == {"fashion-clip", "fashion-sd", "fashion-flux", "mnist-ddpm"}


def test_loader_error_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        load_split("train", root=tmp_path)
    assert ENV_VAR in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="validation"):
        load_split("validation")


def _write_idx_gz(path, array):
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


def test_loader_reads_an_xz_copy_made_by_pack_xz(tmp_path):
    import numpy as np

    from diffusion_accel.zoo.data import pack_xz

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, (5,))
    source = tmp_path / "gz"
    source.mkdir()
    for split in ("train", "t10k"):
        _write_idx_gz(source / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx_gz(source / f"{split}-labels-idx1-ubyte.gz", labels)
    written = pack_xz(tmp_path / "xz", "train", root=source)
    assert sorted(p.name for p in written) == ["train-images-idx3-ubyte.xz", "train-labels-idx1-ubyte.xz"]
    got_images, got_labels = load_split("train", root=tmp_path / "xz")
    assert torch.equal(got_images, torch.from_numpy(images.astype("uint8")))
    assert got_labels.tolist() == labels.tolist()
    test_only = pack_xz(tmp_path / "test_xz", "test", root=_only_test_files(source, tmp_path / "t10k"))
    assert sorted(p.name for p in test_only) == ["t10k-images-idx3-ubyte.xz", "t10k-labels-idx1-ubyte.xz"]


def _only_test_files(source, folder):
    """A copy of ``source`` without the train files (packing the test split needed them)."""
    import shutil

    folder.mkdir()
    for path in source.glob("t10k-*"):
        shutil.copy(path, folder / path.name)
    return folder


def test_loader_finds_one_split_raw_files_and_names_damaged_or_mismatched_ones(tmp_path, monkeypatch):
    """Only test files, or gunzipped ones, were 'not found'; a damaged file's error named no path;
    another split's labels loaded silently; a wrong $DIFFUSION_ACCEL_FASHION_MNIST fell back to Debian's."""
    import numpy as np

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, (5,))
    _write_idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    assert load_split("test", root=tmp_path)[0].shape == (5, 28, 28)
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        import gzip

        (raw / name).write_bytes(gzip.decompress((tmp_path / f"{name}.gz").read_bytes()))
    assert load_split("test", root=raw)[1].tolist() == labels.tolist()
    _write_idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (7,)))
    with pytest.raises(ValueError, match="5 images but 7 labels"):
        load_split("test", root=tmp_path)
    _write_idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", images)  # images saved under the labels name
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte.gz is damaged .*not one of unsigned bytes in 1 dim"):
        load_split("test", root=tmp_path)
    _write_idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("HOME", str(tmp_path.parent))  # ~ in root= and in the variable: "not found" until s53
    assert load_split("test", root=f"~/{tmp_path.name}")[0].shape == (5, 28, 28)
    monkeypatch.setenv(ENV_VAR, f"~/{tmp_path.name}")
    assert find_root(split="test") == tmp_path
    _write_idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", np.arange(5 * 28 * 28).reshape(5, 28, 28) % 7 * 30)
    stream = bytearray((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    stream[len(stream) // 2:len(stream) // 2 + 8] = b"\xff" * 8  # damaged inside: a zlib.error traceback until s53
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(stream))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is damaged"):
        load_split("test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is damaged"):
        load_split("test", root=tmp_path)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_root()


@needs_data
def test_loader_shapes_and_range():
    images, labels = load_split("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and set(labels.tolist()) == set(range(10))
    x = to_rgb32(images[:4])
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 2]) and (x[:, :, :2] == -1).all()


def test_clip_tokenizer_whole_words_and_round_trip(tmp_path):
    tok = build_clip_tokenizer()
    ids = tok("a photo of an ankle boot").input_ids
    assert tok.convert_ids_to_tokens(ids)[1:-1] == ["a</w>", "photo</w>", "of</w>", "an</w>", "ankle</w>", "boot</w>"]
    assert len(tok("a zebra").input_ids) > 4  # unknown words fall back to bytes
    tok.save_pretrained(tmp_path)
    again = type(tok).from_pretrained(tmp_path)
    assert [again(c).input_ids for c in all_captions()] == [tok(c).input_ids for c in all_captions()]
    assert again.model_max_length == tok.model_max_length


def test_t5_tokenizer_word_level():
    tok = build_t5_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok("a grayscale image of a pair of trousers").input_ids)
    assert pieces == ["\u2581a", "\u2581grayscale", "\u2581image", "\u2581of", "\u2581a", "\u2581pair",
                      "\u2581of", "\u2581trousers", "</s>"]
    assert all(w.isalpha() or w == "-" for w in vocabulary())


def test_t5_tokenizer_lowercases_like_the_clip_ones_also_when_shipped(tmp_path):
    """fashion-flux's T5 tokenizer was case-sensitive: "A Sneaker" became <unk> and letters, and the model drew bags."""
    from transformers import AutoTokenizer

    built = build_t5_tokenizer()
    built.save_pretrained(tmp_path)
    for tok in (built, AutoTokenizer.from_pretrained(tmp_path), zoo.load("fashion-flux").tokenizer_2):
        assert tok("A Sneaker on a PLAIN background").input_ids == tok("a sneaker on a plain background").input_ids
        assert tok.convert_ids_to_tokens(tok("A Sneaker").input_ids) == ["\u2581a", "\u2581sneaker", "</s>"]


def test_fashion_clip_round_trip_and_clip_score(tmp_path):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    model, processor = zoo.load("fashion-clip")
    model.save_pretrained(tmp_path), processor.save_pretrained(tmp_path)
    again = CLIPModel.from_pretrained(tmp_path).eval()
    inputs = CLIPProcessor.from_pretrained(tmp_path)(text=["a photo of a bag"], images=[torch.zeros(3, 32, 32)],
                                                     return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = model(**inputs), again(**inputs)
    assert torch.allclose(a.logits_per_image, b.logits_per_image)
    metric = CLIPScore(model_name_or_path=zoo.clip_score_loader)
    score = metric(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), ["a bag", "a sneaker"])
    assert torch.isfinite(score)


@pytest.mark.parametrize("name", ["fashion-sd", "fashion-flux"])
def test_zoo_pipeline_generates_offline(name, monkeypatch):
    from diffusion_accel.pipeline_defaults import call_defaults

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = zoo.load(name)
    assert pipe.vae.dtype == torch.float32
    assert call_defaults(pipe) == zoo.CALL_DEFAULTS[name]  # e.g. fashion-flux's 32-token T5, true CFG
    out = pipe("a photo of a sneaker", num_inference_steps=2, output_type="np",  # native 32×32 by default
               generator=torch.Generator().manual_seed(0), **call_defaults(pipe))
    image = out.images[0]
    assert image.shape == (32, 32, 3) and (image >= 0).all() and (image <= 1).all()
    from diffusion_accel.artifact import pipeline_source

    assert pipeline_source(pipe) == {"spec": f"zoo:{name}", "dtype": "float32"}  # what artifacts record


def test_load_reads_another_export_of_the_model(tmp_path, monkeypatch):
    """zoo.load(name, folder=...) loads a candidate export with the shipped model's settings; ``~`` in the folder
    is the home folder (it was taken literally until session 50)."""
    import shutil

    from diffusion_accel.artifact import pipeline_source as artifact_source

    shutil.copytree(zoo.path("fashion-flux"), tmp_path / "candidate")
    monkeypatch.setenv("HOME", str(tmp_path))
    pipe = zoo.load("fashion-flux", folder="~/candidate")
    assert pipe.default_sample_size * pipe.vae_scale_factor == zoo.NATIVE_SIZE
    assert pipe.transformer.dtype == torch.float32
    assert "zoo:" not in str(artifact_source(pipe))  # another export is not the shipped model
    with pytest.raises(FileNotFoundError, match="missing.*model_index.json"):
        zoo.load("fashion-sd", folder=tmp_path / "missing")


@pytest.mark.parametrize("name, missing", [("fashion-clip", "tokenizer.json"), ("fashion-sd", "tokenizer/tokenizer.json"),
                                           ("fashion-flux", "tokenizer_2/tokenizer.json")])
def test_a_folder_missing_its_tokenizer_is_refused(tmp_path, name, missing):
    """Without tokenizer.json transformers built a 2-token vocabulary (T5: 4): every prompt became unknown
    tokens and the model loaded without an error."""
    import shutil

    shutil.copytree(zoo.path(name), tmp_path / name)
    (tmp_path / name / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"lacks {missing}: its word-level tokenizer"):
        zoo.load(name, folder=tmp_path / name)


def test_a_zoo_folder_given_as_a_pipeline_spec_keeps_its_call_settings(tmp_path):
    """--pipe PATH to the zoo's folder (or a copy, or a training export) loads what zoo.load does: before,
    diffusers' plain loading lost fashion-flux's 32-token T5, true CFG and 32-px size."""
    import shutil

    from diffusion_accel.loading import load_pipeline
    from diffusion_accel.pipeline_defaults import call_defaults
    from diffusion_accel.testing.tiny import build_tiny

    shutil.copytree(zoo.path("fashion-flux"), tmp_path / "copy")
    for folder in (zoo.path("fashion-flux"), tmp_path / "copy"):
        pipe = load_pipeline(str(folder), dtype="bf16")
        assert call_defaults(pipe) == zoo.CALL_DEFAULTS["fashion-flux"], folder
        assert pipe.default_sample_size * pipe.vae_scale_factor == zoo.NATIVE_SIZE
        assert pipe.transformer.dtype == torch.bfloat16
    zoo.load("fashion-flux").save_pretrained(tmp_path / "saved")  # no train_info.json: known by its denoiser's
    assert call_defaults(load_pipeline(str(tmp_path / "saved"))) == zoo.CALL_DEFAULTS["fashion-flux"]  # config (s45)
    build_tiny("flux").save_pretrained(tmp_path / "other")  # any other save_pretrained folder: diffusers as is
    assert call_defaults(load_pipeline(str(tmp_path / "other"))) == {}


def test_a_zoo_spec_in_half_precision_loads_what_zoo_load_does():
    """`zoo:fashion-flux` with dtype fp16 loaded in float32 and cast: T5's layers transformers keeps in float32 were
    cast too, so images (and an artifact reloaded by its spec) differed from zoo.load(name, float16)'s."""
    from diffusion_accel.loading import load_pipeline

    by_spec, direct = load_pipeline("zoo:fashion-flux", dtype="fp16"), zoo.load("fashion-flux", torch.float16)
    dtypes = {name: tensor.dtype for name, tensor in direct.text_encoder_2.state_dict().items()}
    assert torch.float32 in dtypes.values()  # the kept-in-float32 layers this is about
    assert {name: tensor.dtype for name, tensor in by_spec.text_encoder_2.state_dict().items()} == dtypes


def test_pipelines_built_from_a_compiled_denoiser_keep_the_zoo_call_settings():
    """After pipe.unet = torch.compile(pipe.unet) the tag sat on _orig_mod: from_pipe / **components got {}
    (fashion-sd ran at diffusers' CFG 7.5, not 3.0)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from diffusion_accel.pipeline_defaults import call_defaults

    pipe = zoo.load("fashion-sd")
    pipe.unet = torch.compile(pipe.unet)
    assert call_defaults(StableDiffusionImg2ImgPipeline(**pipe.components)) == zoo.CALL_DEFAULTS["fashion-sd"]


def test_an_artifact_saved_from_a_zoo_pipelines_sibling_names_the_zoo_model():
    """The sibling's source was diffusers' _name_or_path: this machine's install folder, not zoo:fashion-sd."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from diffusion_accel.artifact import pipeline_source

    pipe = zoo.load("fashion-sd", torch.bfloat16)
    expected = {"spec": "zoo:fashion-sd", "dtype": "bfloat16"}
    assert pipeline_source(StableDiffusionImg2ImgPipeline.from_pipe(pipe)) == pipeline_source(pipe) == expected


@needs_data
def test_training_smoke_run_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RUNS_ROOT", tmp_path)
    monkeypatch.setenv("DIFFUSION_ACCEL_THREADS", "1")  # tiny ops: one thread avoids oversubscription
    threads = torch.get_num_threads()
    try:
        _run_all_stages(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _run_all_stages(tmp_path):
    from diffusion_accel.zoo import clip_train, decoder_train, flux_train, sd_train, vae_train

    stages = [(clip_train, "fashion-clip"), (vae_train, "fashion-sd-vae"), (decoder_train, "fashion-sd-decoder"),
              (sd_train, "fashion-sd"), (vae_train, "fashion-flux-vae"), (flux_train, "fashion-flux")]
    for module, name in stages:
        cfg = C.RunConfig(run_dir=tmp_path / name, steps=2, batch_size=8, limit_images=32)
        folder = module.train(cfg, name)
        assert (folder / "train_info.json").is_file()
        assert C.load_checkpoint(tmp_path / name / "checkpoint.pt")["step"] == 2
    assert (tmp_path / "fashion-sd" / "final" / "model_index.json").is_file()
    _check_decoder_stage_kept_the_latent_space(tmp_path)
    cfg = C.RunConfig(run_dir=tmp_path / "fashion-sd-vae", steps=3, batch_size=8, limit_images=32)
    vae_train.train(cfg, "fashion-sd-vae")
    assert C.load_checkpoint(tmp_path / "fashion-sd-vae" / "checkpoint.pt")["step"] == 3
    _check_flux_arch(tmp_path)


def _check_flux_arch(tmp_path):
    """--arch large builds the 4 + 8 block transformer and records it; a resumed run keeps its arch, and
    resuming it as another arch is refused before any weight loads (a state-dict shape error before)."""
    import json

    from diffusers import FluxTransformer2DModel

    from diffusion_accel.zoo import flux_train

    cfg = C.RunConfig(run_dir=tmp_path / "flux-large", steps=1, batch_size=4, limit_images=16, arch="large")
    folder = flux_train.train(cfg, "fashion-flux")
    config = FluxTransformer2DModel.load_config(folder / "transformer")
    assert (config["num_layers"], config["num_single_layers"]) == flux_train.ARCHS["large"] == (4, 8)
    assert json.loads((folder / "train_info.json").read_text())["arch"] == "large"
    assert flux_train.checked_arch(C.RunConfig(run_dir=tmp_path / "flux-large", steps=2)) == ("large", True)
    with pytest.raises(ValueError, match=r"holds a 'large' transformer, not 'small': resume without --arch"):
        flux_train.train(C.RunConfig(run_dir=tmp_path / "flux-large", steps=2, arch="small"), "fashion-flux")
    assert flux_train.checked_arch(C.RunConfig(run_dir=tmp_path / "fashion-flux", steps=2)) == ("small", False)
    # restating a resumed run's own arch keeps the checkpoint's answer: a warm start stayed one (until session 49)
    assert flux_train.checked_arch(C.RunConfig(run_dir=tmp_path / "fashion-flux", steps=2, arch="small")) == (
        "small", False)
    assert flux_train.checked_arch(C.RunConfig(run_dir=tmp_path / "flux-large", steps=2, arch="large")) == (
        "large", True)
    old = tmp_path / "flux-old"  # a checkpoint from before arch_chosen: --arch given on resume chose it
    old.mkdir()
    torch.save({"arch": "large", "step": 1}, old / "checkpoint.pt")
    assert flux_train.checked_arch(C.RunConfig(run_dir=old, steps=2, arch="large")) == ("large", True)


def _check_decoder_stage_kept_the_latent_space(tmp_path):
    """The decoder stage changes only decoding; fashion-sd ships it with the VAE stage's encoder."""
    from diffusers import AutoencoderKL

    source = AutoencoderKL.from_pretrained(tmp_path / "fashion-sd-vae" / "final").state_dict()
    tuned = AutoencoderKL.from_pretrained(tmp_path / "fashion-sd-decoder" / "final")
    shipped = AutoencoderKL.from_pretrained(tmp_path / "fashion-sd" / "final" / "vae").state_dict()
    assert tuned.config.scaling_factor == AutoencoderKL.load_config(tmp_path / "fashion-sd-vae" / "final")["scaling_factor"]
    for key, tensor in tuned.state_dict().items():
        if key.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(tensor, source[key]), key
        assert torch.equal(tensor, shipped[key]), key
    assert not all(torch.equal(t, source[k]) for k, t in tuned.state_dict().items() if k.startswith("decoder."))


@needs_data
def test_a_larger_flux_transformer_trains_from_scratch_on_the_shipped_frozen_parts(tmp_path, monkeypatch):
    """--arch large --init-from zoo: what a lent GPU runs with no earlier stage on disk: the VAE, CLIP and
    tokenizers of the shipped pipeline, a fresh 4 + 8 block transformer and T5."""
    import json

    from diffusers import FluxTransformer2DModel

    from diffusion_accel.zoo import flux_train

    monkeypatch.setattr(C, "RUNS_ROOT", tmp_path / "runs")  # no trained stages to fall back on
    monkeypatch.setenv("DIFFUSION_ACCEL_THREADS", "1")
    threads = torch.get_num_threads()
    run_dir = tmp_path / "runs" / "fashion-flux"
    # then resumed without --arch: the checkpoint's fresh large run goes on (not the source's small one)
    for steps, arch in ((1, "large"), (2, None)):
        cfg = C.RunConfig(run_dir=run_dir, steps=steps, batch_size=4, limit_images=16, init_from="zoo", arch=arch)
        try:
            folder = flux_train.train(cfg, "fashion-flux")
        finally:
            torch.set_num_threads(threads)
        config = FluxTransformer2DModel.load_config(folder / "transformer")
        assert (config["num_layers"], config["num_single_layers"]) == (4, 8)
        assert C.load_checkpoint(run_dir / "checkpoint.pt")["step"] == steps
    info = json.loads((folder / "train_info.json").read_text())
    assert info["arch"] == "large" and info["frozen_parts_from"] == "zoo:fashion-flux" and "init_steps" not in info
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == json.loads((zoo.path("fashion-flux") / "vae" / "config.json").read_text())[
        "scaling_factor"]


@needs_data
@pytest.mark.parametrize("name, denoiser", [("fashion-sd", "unet"), ("fashion-flux", "transformer")])
def test_warm_start_from_the_shipped_model(name, denoiser, tmp_path, monkeypatch):
    """--init-from zoo needs no earlier stage: weights, frozen parts and step history come from the shipped pipeline."""
    import json

    from safetensors.torch import load_file

    from diffusion_accel.zoo import flux_train, sd_train

    from diffusion_accel.zoo.ship import main as ship_main

    monkeypatch.setattr(C, "RUNS_ROOT", tmp_path / "runs")  # no trained stages to fall back on
    monkeypatch.setenv("DIFFUSION_ACCEL_THREADS", "1")
    threads = torch.get_num_threads()
    module = sd_train if name == "fashion-sd" else flux_train
    cfg = C.RunConfig(run_dir=tmp_path / "runs" / name, steps=1, batch_size=4, limit_images=16, init_from="zoo", lr=1e-9)
    try:
        folder = module.train(cfg, name)
    finally:
        torch.set_num_threads(threads)
    shipped = load_file(str(zoo.path(name) / denoiser / "diffusion_pytorch_model.safetensors"))
    tuned = load_file(str(folder / denoiser / "diffusion_pytorch_model.safetensors"))
    assert max((tuned[k].float() - t.float()).abs().max().item() for k, t in shipped.items()) < 1e-6
    info = json.loads((folder / "train_info.json").read_text())
    assert info["init_steps"] == C.source_steps(zoo.path(name)) > 0
    assert info["total_steps"] == info["init_steps"] + 1 and info["peak_lr"] == 1e-9
    # the card records whether bf16 autocast ran: the flux stages autocast where bf16 is native, sd's never
    assert info["bf16_autocast"] is (name == "fashion-flux" and C.bf16_autocast_wanted("cpu"))
    ship_main([name, "--from", str(folder), "--dest", str(tmp_path / "staged")])  # e.g. on a GPU machine
    staged = tmp_path / "staged" / name
    weights = load_file(str(staged / denoiser / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in weights.values())
    assert "| init_steps |" in (staged / "README.md").read_text()


@needs_data
def test_decoder_warm_start_ships_with_the_pipeline(tmp_path, monkeypatch):
    """fashion-sd-decoder --init-from zoo tunes the shipped VAE's decoder; ship --vae swaps it into the
    pipeline, and the card keeps the recorded stages and the table of the weights it started from. The decoder
    trains under its own --out (as the shipped card's command did): the card still describes it (until session 45
    it kept the old decoder's table, found only in the default run folder)."""
    import json

    from safetensors.torch import load_file

    from diffusion_accel.zoo import decoder_train
    from diffusion_accel.zoo.ship import main as ship_main

    monkeypatch.setattr(C, "RUNS_ROOT", tmp_path / "runs")
    monkeypatch.setenv("DIFFUSION_ACCEL_THREADS", "1")
    threads = torch.get_num_threads()
    cfg = C.RunConfig(run_dir=tmp_path / "elsewhere" / "fashion-sd-decoder-s45", steps=1, batch_size=4,
                      limit_images=16, init_from="zoo", lr=1e-3)
    try:
        folder = decoder_train.train(cfg, "fashion-sd-decoder")
    finally:
        torch.set_num_threads(threads)
    info = json.loads((folder / "train_info.json").read_text())
    assert info["init_from"] == "zoo:fashion-sd" and "source" not in info and info["peak_lr"] == 1e-3
    shipped = load_file(str(zoo.path("fashion-sd") / "vae" / "diffusion_pytorch_model.safetensors"))
    tuned = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(tuned[k].half(), t) for k, t in shipped.items() if k.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(tuned[k].half(), t) for k, t in shipped.items() if k.startswith("decoder."))
    ship_main(["fashion-sd", "--from", str(zoo.path("fashion-sd")), "--dest", str(tmp_path / "staged"),
               "--vae", str(folder)])
    staged = tmp_path / "staged" / "fashion-sd"
    vae = load_file(str(staged / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(vae[k], t.half()) for k, t in tuned.items())
    card = (staged / "README.md").read_text()
    assert "### Stage `fashion-sd-vae`" in card  # not rerun: the recorded table stays
    assert "### Stage `fashion-sd-decoder` (the shipped weights it started from)" in card
    assert "| init_from | zoo:fashion-sd |" in card and "### Stage `fashion-sd`\n" in card
    assert f"| test_psnr_db | {info['test_psnr_db']} |" in card and "| peak_lr | 0.001 |" in card
    ship_main(["fashion-sd", "--from", str(staged), "--dest", str(tmp_path / "staged"), "--vae", str(folder)])
    assert load_file(str(staged / "vae" / "diffusion_pytorch_model.safetensors")).keys() == vae.keys()  # onto itself
    assert not (tmp_path / "staged" / ".fashion-sd.staging").exists()


def test_ship_vae_refuses_another_latent_space(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from diffusion_accel.zoo.ship import ship

    other = tmp_path / "vae"
    shutil.copytree(zoo.path("fashion-sd") / "vae", other)
    weights = load_file(str(other / "diffusion_pytorch_model.safetensors"))
    weights["encoder.conv_in.weight"] = weights["encoder.conv_in.weight"] + 1
    save_file(weights, str(other / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="encoder differs.*encoder.conv_in.weight"):
        ship("fashion-sd", zoo.path("fashion-sd"), tmp_path / "staged", vae=other)
    with pytest.raises(ValueError, match="scaling_factor"):
        ship("fashion-sd", zoo.path("fashion-sd"), tmp_path / "staged", vae=zoo.path("fashion-flux") / "vae")
    shutil.rmtree(other)
    shutil.copytree(zoo.path("fashion-sd") / "vae", other)  # same weights, other encoder groups: latents 1.76 off
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "norm_num_groups": config["norm_num_groups"] * 2}))
    with pytest.raises(ValueError, match=r"config differs from the pipeline's in norm_num_groups"):
        ship("fashion-sd", zoo.path("fashion-sd"), tmp_path / "staged", vae=other)
    with pytest.raises(ValueError, match="not to fashion-clip"):
        ship("fashion-clip", zoo.path("fashion-clip"), tmp_path / "staged", vae=other)
    assert not (tmp_path / "staged").exists()


def test_ship_with_a_missing_metrics_file_ships_nothing(tmp_path):
    """The metrics file was read after the weights had shipped: the command failed (exit 2) and left the new weights
    under the old card (session 47)."""
    from diffusion_accel.zoo.ship import main as ship_main

    with pytest.raises(SystemExit) as exit_info:
        ship_main(["mnist-ddpm", "--from", str(zoo.path("mnist-ddpm")), "--dest", str(tmp_path / "staged"),
                   "--metrics", str(tmp_path / "missing.md")])
    assert exit_info.value.code == 2 and not (tmp_path / "staged" / "mnist-ddpm").exists()


def test_warm_start_rejects_bad_sources(tmp_path):
    from diffusion_accel.zoo.train import add_train_arguments, run

    parser = add_train_arguments(argparse.ArgumentParser())
    with pytest.raises(ValueError, match="--init-from applies to"):
        run(parser.parse_args(["fashion-sd-vae", "--init-from", "zoo"]))
    with pytest.raises(ValueError, match="--lr applies to"):
        run(parser.parse_args(["fashion-flux-vae", "--lr", "1e-4"]))
    with pytest.raises(ValueError, match="--lr applies to"):
        run(parser.parse_args(["fashion-clip", "--lr", "1e-4"]))
    with pytest.raises(ValueError, match="--arch applies to fashion-flux, not to 'fashion-sd'"):
        run(parser.parse_args(["fashion-sd", "--arch", "large"]))
    from diffusion_accel.zoo.flux_train import ARCHS

    arch_option = next(action for action in parser._actions if action.dest == "arch")
    assert sorted(arch_option.choices) == sorted(ARCHS)  # the CLI names them without importing diffusers
    programmatic = parser.parse_args(["fashion-sd"])
    programmatic.lr = 0.0
    with pytest.raises(ValueError, match="--lr must be > 0"):
        run(programmatic)
    cfg = C.RunConfig(run_dir=tmp_path, steps=1, init_from=tmp_path)
    with pytest.raises(ValueError, match="model_index.json"):
        C.init_source(cfg, "fashion-sd")


def test_cli_register_parses_train_options():
    from diffusion_accel.zoo.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["zoo", "train", "fashion-sd", "--steps", "5", "--time-budget-min", "1.5",
                              "--seed", "3", "--no-resume"])
    assert (args.name, args.steps, args.time_budget_min, args.seed, args.resume) == ("fashion-sd", 5, 1.5, 3, False)
    assert parser.parse_args(["zoo", "list"]).func.__name__ == "_list"


def test_zoo_list_and_path_tell_an_incomplete_folder_from_a_missing_one(tmp_path, monkeypatch, capsys):
    """A folder without model_index.json was listed with its size as shipped, and zoo.path called it missing
    (until session 48)."""
    import shutil

    from diffusion_accel.zoo.cli import _list

    shutil.copytree(zoo.MODELS_DIR / "fashion-clip", tmp_path / "fashion-clip")
    (tmp_path / "fashion-sd").mkdir()
    (tmp_path / "fashion-sd" / "unet").mkdir()
    monkeypatch.setattr(zoo, "MODELS_DIR", tmp_path)
    assert _list(argparse.Namespace()) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert " MB " in lines["fashion-clip"] and "incomplete" in lines["fashion-sd"]
    assert "lacks model_index.json" in lines["fashion-sd"] and lines["fashion-flux"].endswith("not shipped")
    with pytest.raises(FileNotFoundError, match="lacks model_index.json: an incomplete copy"):
        zoo.path("fashion-sd")
    with pytest.raises(FileNotFoundError, match="fashion-flux is missing"):
        zoo.path("fashion-flux")
    # the demo (eval, bench, grid without --pipe) ran on the random tiny pipeline instead, exit 0 (session 51)
    from diffusion_accel.cli import main
    from diffusion_accel.loading import default_demo_spec

    with pytest.raises(FileNotFoundError, match="an incomplete copy"):
        default_demo_spec()
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "an incomplete copy" in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_a_zoo_folder_missing_a_components_files_is_incomplete_not_shipped(tmp_path, monkeypatch, capsys):
    """Only model_index.json and the tokenizers were checked: a copy without unet/ (or its weights, or without
    fashion-clip's weights) was listed as shipped and failed to load blaming the pipeline folder's config.json
    (until session 49)."""
    import shutil

    from diffusion_accel.zoo.cli import _list

    for name in ("fashion-clip", "fashion-sd", "mnist-ddpm"):
        shutil.copytree(zoo.MODELS_DIR / name, tmp_path / name)
    shutil.rmtree(tmp_path / "fashion-sd" / "unet")
    for weights in (tmp_path / "fashion-clip").glob("*.safetensors"):
        weights.unlink()
    for weights in (tmp_path / "mnist-ddpm" / "unet").glob("*.safetensors"):
        weights.unlink()
    monkeypatch.setattr(zoo, "MODELS_DIR", tmp_path)
    assert _list(argparse.Namespace()) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "incomplete" in lines["fashion-sd"] and "lacks unet/:" in lines["fashion-sd"]
    assert "lacks unet/*.safetensors" in lines["mnist-ddpm"] and "lacks *.safetensors" in lines["fashion-clip"]
    with pytest.raises(FileNotFoundError, match="lacks unet/: an incomplete copy"):
        zoo.load("fashion-sd")
    with pytest.raises(FileNotFoundError, match="lacks unet/: an incomplete copy"):
        zoo.load("fashion-sd", folder=tmp_path / "fashion-sd")
    monkeypatch.undo()
    zoo.load("mnist-ddpm").save_pretrained(tmp_path / "bin", safe_serialization=False)  # .bin weights are weights
    assert type(zoo.load("mnist-ddpm", folder=tmp_path / "bin")).__name__ == "DDPMPipeline"


def test_input_paths_expand_home_also_after_an_equals_sign(tmp_path, monkeypatch):
    """`--init-from=~/exp/fashion-sd` (the shell expands no ~ after '=') was "not an exported pipeline folder",
    as was `init_from="~/..."` in Python, and `ship --from=~/...` / `--data=~/...` named no folder (until
    session 45)."""
    from diffusion_accel.zoo.ship import main as ship_main
    from diffusion_accel.zoo.train import add_train_arguments

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "fashion-sd").symlink_to(zoo.path("fashion-sd"))
    args = add_train_arguments(argparse.ArgumentParser()).parse_args(
        ["fashion-sd", "--init-from=~/exp/fashion-sd", "--data=~/data"])
    assert (args.init_from, args.data) == (str(tmp_path / "exp" / "fashion-sd"), str(tmp_path / "data"))
    assert C.init_source(C.RunConfig(run_dir=tmp_path / "run", steps=1, init_from="~/exp/fashion-sd"),
                         "fashion-sd") == tmp_path / "exp" / "fashion-sd"
    ship_main(["fashion-sd", "--from=~/exp/fashion-sd", "--dest=~/staged"])
    assert (tmp_path / "staged" / "fashion-sd" / "model_index.json").is_file()


def test_the_stand_alone_zoo_cli_reports_bad_options_in_one_line(tmp_path, capsys):
    """`python -m diffusion_accel.zoo.cli zoo train fashion-sd-vae --arch small` printed a traceback (exit 1)."""
    from diffusion_accel.zoo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["zoo", "train", "fashion-sd-vae", "--arch", "small", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and "error: " in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fashion-sd", "fashion-flux"])
def test_pipelines_share_the_fashion_clip_text_tower(name):
    from safetensors.torch import load_file

    clip = load_file(str(zoo.path("fashion-clip") / "model.safetensors"))
    tower = load_file(str(zoo.path(name) / "text_encoder" / "model.safetensors"))
    assert tower and all(torch.equal(tensor, clip[key]) for key, tensor in tower.items())


def test_decoder_finetune_adversarial_loss_trains_only_the_decoder():
    from diffusion_accel.zoo import decoder_train, vae_train

    torch.manual_seed(0)
    vae = vae_train.build_vae(4)
    params = decoder_train.decoder_parameters(vae)
    disc = decoder_train.build_discriminator(channels=16)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, rec, _ = decoder_train.generator_loss(vae, disc, x, adv_weight=0.2)
    loss.backward()
    assert rec.shape == x.shape and disc(x).shape == (2, 1, 4, 4)
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for p in vae.encoder.parameters())
    assert decoder_train.discriminator_loss(disc, x, rec).item() >= 0
    with pytest.raises(ValueError, match="fashion-sd-decoder"):
        decoder_train.default_steps("fashion-sd")


def test_clip_score_truncates_long_prompts_keeping_the_end_token(monkeypatch):
    """torchmetrics cuts tokens past the text tower's 16 positions after tokenizing, which drops the
    end token CLIP pools at (long prompts then scored 0); our processors truncate while tokenizing."""
    import warnings

    from diffusion_accel.eval.clip_score import clip_score

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, processor = zoo.clip_score_loader()
    long = "a photo of a sneaker on a plain background seen from the front in soft light, a long caption"
    ids = processor(text=[long], padding=True, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 16 and ids[0, -1] == processor.tokenizer.eos_token_id
    image = zoo.load("fashion-sd")("a photo of a sneaker", num_inference_steps=8, output_type="pt",
                                   generator=torch.Generator().manual_seed(0)).images
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "max_length is ignored" on every call
        score = clip_score(image, [long], model=zoo.path("fashion-clip"))
    assert score > 10


def test_the_fashion_prompt_set_is_the_training_captions():
    """The bundled prompts must use the words the zoo was trained on ("a pair of trousers", not the
    out-of-vocabulary "a trouser", which both pipelines drew as other garments)."""
    from diffusion_accel import prompts
    from diffusion_accel.zoo.captions import caption

    assert prompts.load("fashion") == [caption(label, 0) for label in range(10)]


def test_training_autocasts_to_bf16_on_cpus_with_native_bf16_only_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv(C.AUTOCAST_ENV, raising=False)
    monkeypatch.setattr(C, "native_bf16_cpu", lambda: False)  # emulated bf16: float32 trains faster
    assert not C.bf16_autocast_wanted("cpu") and not C.bf16_autocast_wanted("cuda")
    monkeypatch.setattr(C, "native_bf16_cpu", lambda: True)
    assert C.bf16_autocast_wanted("cpu") and not C.bf16_autocast_wanted("cuda")
    with C.autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
    monkeypatch.setenv(C.AUTOCAST_ENV, "0")
    with C.autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setenv(C.AUTOCAST_ENV, "1")
    monkeypatch.setattr(C, "native_bf16_cpu", lambda: False)
    assert C.bf16_autocast_wanted("cuda") and C.bf16_autocast_wanted("cpu")
    monkeypatch.setenv(C.AUTOCAST_ENV, "yes")
    with pytest.raises(ValueError, match="DIFFUSION_ACCEL_AUTOCAST must be '0' or '1', got 'yes'"):
        C.bf16_autocast_wanted("cpu")


def test_gpu_training_turns_off_cudnn_attention(monkeypatch):
    """cuDNN's fused attention failed in its bf16 backward on an H200 (torch 2.11, CUDA 13): trainers avoid it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    flags = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    try:
        assert C.setup_device().type == "cuda"
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(flags[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[1:]


@pytest.mark.parametrize("option, value, message", [
    ("--steps", "0", "must be an int >= 1, got 0"),  # 0 used to mean the default (a full run)
    ("--steps", "-5", "must be an int >= 1, got -5"),
    ("--batch-size", "0", "must be an int >= 1, got 0"),
    ("--time-budget-min", "-1", "must be a finite number > 0, got -1.0"),  # stopped after one step and exported
    ("--lr", "0", "must be a finite number > 0, got 0.0"),
])
def test_train_options_reject_bad_numbers_before_training(capsys, option, value, message):
    from diffusion_accel.zoo.train import add_train_arguments

    with pytest.raises(SystemExit):
        add_train_arguments(argparse.ArgumentParser()).parse_args(["fashion-clip", option, value])
    assert f"argument {option}: {message}" in capsys.readouterr().err


def test_a_card_describes_only_the_shipped_weights(tmp_path):
    """The card read every stage from the runs folder: a from-scratch run's table beside warm-started
    weights, or a VAE run whose weights were not the shipped VAE's."""
    import json

    from safetensors.torch import save_file

    from diffusion_accel.zoo.card import shipped_stage_info

    shipped, runs = tmp_path / "fashion-sd", tmp_path / "runs"
    for folder, info, encoder in ((shipped, {"command": "warm start"}, 1.0),
                                  (runs / "fashion-sd" / "final", {"command": "from scratch"}, 1.0),
                                  (runs / "fashion-sd-vae" / "final", {"command": "vae run"}, 2.0)):
        vae = folder / "vae" if folder == shipped else folder
        vae.mkdir(parents=True)
        save_file({"encoder.w": torch.full((2,), encoder, dtype=torch.float16 if folder == shipped else torch.float32),
                   "decoder.w": torch.zeros(2)}, str(vae / "diffusion_pytorch_model.safetensors"))
        (folder / "train_info.json").write_text(json.dumps(info))
    assert shipped_stage_info("fashion-sd", "fashion-sd", shipped, runs) == {"command": "warm start"}
    assert shipped_stage_info("fashion-sd", "fashion-sd-vae", shipped, runs) is None  # another encoder
    save_file({"encoder.w": torch.ones(2), "decoder.w": torch.ones(2)},
              str(runs / "fashion-sd-vae" / "final" / "diffusion_pytorch_model.safetensors"))
    assert shipped_stage_info("fashion-sd", "fashion-sd-vae", shipped, runs) == {"command": "vae run"}


def test_python_m_train_reports_user_errors_in_one_line(capsys):
    """`python -m diffusion_accel.zoo.train` (the README's mnist-ddpm command) printed tracebacks."""
    from diffusion_accel.zoo.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fashion-clip", "--lr", "1e-3"])
    assert exit_info.value.code == 2
    assert "python -m diffusion_accel.zoo.train: error: --lr applies to" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not a checkpoint", b"PK\x03\x04truncated zip"])
def test_a_damaged_checkpoint_is_a_clear_error_naming_it(tmp_path, content, capsys):
    """A truncated or foreign checkpoint.pt printed torch's raw traceback (PytorchStreamReader / Unpickling)."""
    from diffusion_accel.zoo.train import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot resume from '.*checkpoint.pt': it is not a readable checkpoint "
                                         r".*start over with --no-resume"):
        C.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(SystemExit) as exit_info:
        main(["fashion-clip", "--out", str(tmp_path / "run"), "--steps", "1"])
    assert exit_info.value.code == 2 and "cannot resume from" in capsys.readouterr().err


def test_an_unreadable_checkpoint_keeps_its_os_error(tmp_path, monkeypatch):
    """Permissions or I/O: the file may be fine, so no advice to delete it or start over."""
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    monkeypatch.setattr(C.torch, "load", lambda *args, **kwargs: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(PermissionError):
        C.load_checkpoint(tmp_path / "checkpoint.pt")


def test_the_text_tower_loads_from_fashion_clip_without_a_load_report(capfd):
    """Trainers take fashion-clip's text tower from the full CLIPModel folder: transformers' report of every
    skipped vision weight (UNEXPECTED) is not printed, and transformers' verbosity is left as it was."""
    from transformers.utils import logging as hf_logging

    from diffusion_accel.zoo.sd_train import clip_text_tower

    verbosity = hf_logging.get_verbosity()
    tower = clip_text_tower(zoo.path("fashion-clip"))
    assert type(tower).__name__ == "CLIPTextModel" and hf_logging.get_verbosity() == verbosity
    assert "UNEXPECTED" not in "".join(capfd.readouterr())


def test_training_runs_of_an_installed_package_go_to_the_user_cache_not_site_packages(monkeypatch, tmp_path):
    assert C.default_runs_root() == C.REPO_ROOT / "zoo_runs"  # this checkout
    monkeypatch.setattr(C, "REPO_ROOT", tmp_path / "site-packages")  # a wheel install: no pyproject.toml there
    assert C.default_runs_root() == Path.home() / ".cache" / "diffusion_accel" / "zoo_runs"


def test_shipping_another_models_export_under_a_name_is_refused(tmp_path, capsys):
    """`zoo.ship fashion-sd --from <a fashion-flux export>` shipped it (into the package by default) until
    session 41."""
    from diffusion_accel.zoo.ship import main as ship_main

    with pytest.raises(SystemExit) as exit_info:
        ship_main(["fashion-sd", "--from", str(zoo.path("fashion-flux")), "--dest", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "holds a FluxPipeline pipeline (model_index.json), not the StableDiffusionPipeline" in error
    assert not any(tmp_path.iterdir())


def test_packing_a_missing_split_is_a_one_line_error(tmp_path, capsys):
    """`python -m diffusion_accel.zoo.data DEST` printed a FileNotFoundError traceback (exit 1) until session 41."""
    from diffusion_accel.zoo.data import main as data_main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        data_main([str(tmp_path / "out"), "--root", str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "python -m diffusion_accel.zoo.data: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_of_one_split_names_the_missing_split(tmp_path):
    """`python -m diffusion_accel.zoo.data DEST` packs the train split alone; a stage also reading the test split
    from it said "Fashion-MNIST not found" (session 47)."""
    from diffusion_accel.zoo.data import find_root

    (tmp_path / "train-images-idx3-ubyte.xz").write_bytes(b"")
    assert find_root(tmp_path, "train") == tmp_path
    with pytest.raises(FileNotFoundError, match=r"holds Fashion-MNIST files but not the test split's \(t10k-images"):
        find_root(tmp_path, "test")


def test_init_from_a_folder_named_zoo_is_that_folder(tmp_path, monkeypatch):
    """`--init-from ./zoo` (or zoo/) was normalised to "zoo" and warm-started from the shipped model (session 47)."""
    from diffusion_accel.zoo import _common as C
    from diffusion_accel.zoo.train import add_train_arguments

    monkeypatch.chdir(tmp_path)
    (tmp_path / "zoo").mkdir()
    parser = add_train_arguments(argparse.ArgumentParser())
    for text in ("./zoo", "zoo/"):
        given = parser.parse_args(["fashion-sd", "--init-from", text]).init_from
        with pytest.raises(ValueError, match="expected 'zoo' or an exported pipeline folder"):
            C.init_source(C.RunConfig(run_dir=tmp_path, steps=1, init_from=given), "fashion-sd")
    shipped = parser.parse_args(["fashion-sd", "--init-from", "zoo"]).init_from
    assert C.init_source(C.RunConfig(run_dir=tmp_path, steps=1, init_from=shipped), "fashion-sd") == \
        zoo.path("fashion-sd")


def test_a_card_written_again_for_the_same_warm_start_lists_its_run_once():
    """ship then ship --metrics (or ship --from twice) renamed the current run's own recorded table as the
    weights it started from and listed it again below."""
    from diffusion_accel.zoo.card import stage_sections, stage_table

    start = stage_table("fashion-sd", {"seed": 0, "steps": 7975})
    info = {"seed": 1, "steps": 5000, "init_from": "zoo:fashion-sd"}
    first = stage_sections("fashion-sd", info, [start])
    assert first == [start.replace("`fashion-sd`", "`fashion-sd` (the shipped weights it started from)"),
                     stage_table("fashion-sd", info)]
    assert stage_sections("fashion-sd", info, first) == first


def test_a_card_of_a_resumed_warm_start_does_not_list_its_own_earlier_export_as_its_start():
    """A warm start shipped after its first command, resumed and shipped again, listed that first export as
    "the shipped weights it started from" (until session 48)."""
    from diffusion_accel.zoo.card import stage_sections, stage_table

    start = stage_table("fashion-sd", {"seed": 0, "steps": 7975})
    first_command = {"seed": 0, "steps": 1, "init_from": "zoo:fashion-sd", "init_steps": 7975, "total_steps": 7976}
    recorded = stage_sections("fashion-sd", first_command, [start])
    resumed = {**first_command, "steps": 3, "total_steps": 7978}
    assert stage_sections("fashion-sd", resumed, recorded) == [recorded[0], stage_table("fashion-sd", resumed)]


@needs_data
def test_a_resumed_warm_start_shipped_between_commands_keeps_its_starting_steps(tmp_path, monkeypatch):
    """--init-from zoo resumed after --ship read init_steps from the shipped model, by then the run's own first
    export: 7976 + 2 instead of 7975 + 3 (until session 48)."""
    import json
    import shutil

    from diffusion_accel.zoo import sd_train
    from diffusion_accel.zoo.ship import ship

    models = tmp_path / "models"
    for name in ("fashion-sd", "fashion-clip"):
        shutil.copytree(zoo.path(name), models / name)
    started_from = C.source_steps(models / "fashion-sd")
    monkeypatch.setattr(zoo, "MODELS_DIR", models)
    monkeypatch.setattr(C, "RUNS_ROOT", tmp_path / "runs")
    monkeypatch.setenv("DIFFUSION_ACCEL_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        for steps, init_from in ((1, "zoo"), (3, None)):
            cfg = C.RunConfig(run_dir=tmp_path / "runs" / "fashion-sd", steps=steps, batch_size=4, limit_images=16,
                              init_from=init_from, lr=1e-9, stage="fashion-sd")
            C.apply_checkpoint_settings(cfg)
            ship("fashion-sd", sd_train.train(cfg, "fashion-sd"), dest_root=models)
    finally:
        torch.set_num_threads(threads)
    info = json.loads((models / "fashion-sd" / "train_info.json").read_text())
    assert (info["init_steps"], info["total_steps"]) == (started_from, started_from + 3)


def test_vae_scaling_factors_come_from_training_images_not_the_test_split():
    """scaling_factor / shift_factor were the test split's latent statistics, and that split is the FID reference."""
    from diffusion_accel.zoo import vae_train

    torch.manual_seed(0)
    vae = vae_train.build_vae(4)
    train = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    test = torch.randint(0, 128, (4, 28, 28), dtype=torch.uint8)
    metrics = vae_train.final_metrics(vae, train, test)
    on_train, on_test = vae_train.evaluate(vae, train), vae_train.evaluate(vae, test)
    assert (metrics["latent_std"], metrics["latent_mean"]) == (on_train["latent_std"], on_train["latent_mean"])
    assert metrics["test_psnr_db"] == on_test["psnr_db"] and on_test["latent_std"] != on_train["latent_std"]


def test_a_flux_card_describes_the_shipped_transformer_size(tmp_path):
    """`zoo train fashion-flux --arch large` shipped 4 + 8 blocks under a card that said 2 + 4 and recorded no arch
    (until session 45)."""
    import json
    import shutil

    from diffusion_accel.zoo.card import write_card

    folder = tmp_path / "fashion-flux"
    shutil.copytree(zoo.path("fashion-flux") / "transformer", folder / "transformer",
                    ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": 4, "num_single_layers": 8}))
    (folder / "train_info.json").write_text(json.dumps({"name": "fashion-flux", "arch": "large",
                                                        "frozen_parts_from": "zoo:fashion-flux"}))
    card = write_card("fashion-flux", folder, runs_root=tmp_path / "runs").read_text()
    assert "`FluxTransformer2DModel` (4 double-stream + 8 single-stream blocks, 4 heads × 32," in card
    assert "| arch | large |" in card and "| frozen_parts_from | zoo:fashion-flux |" in card
    from diffusion_accel.zoo.card import description

    shipped = description("fashion-flux", zoo.path("fashion-flux"))
    assert "(2 double-stream + 4 single-stream blocks, 4 heads × 32," in shipped
