"""On a CUDA GPU: artifacts saved on CPU load and run there (and back), and the real low-precision
kernels (int8 ``_int_mm``, fp8 ``_scaled_mm``, 2:4 semi-structured) compute what the CPU computes.

Skipped where no CUDA device exists (CI). On a GPU machine: ``pytest tests/test_cuda.py``.
"""

import pytest
import torch
from torch import nn

import diffusion_accel as da
from diffusion_accel.cache import summary as cache_summary
from diffusion_accel.prune.sparse import enable_sparse_kernels
from diffusion_accel.quant import PTQConfig, lower_, quantize_, summary
from diffusion_accel.testing.tiny import build_tiny, tiny_call_kwargs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAST = dict(calib_prompts=1, calib_num_steps=2, calib_steps="all")


def _images(pipe, family: str = "sd") -> torch.Tensor:
    return pipe(**tiny_call_kwargs(family)).images.float().cpu()


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("preset, kernel", [("w8a8", "int8-gemm"), ("w4a8", "int4-packed")])
def test_artifact_saved_on_cpu_runs_on_cuda_and_back(tmp_path, preset, kernel):
    pipe = build_tiny("sd")
    quantize_(pipe, PTQConfig.preset(preset, **FAST))
    on_cpu = _images(pipe)
    da.save(pipe, tmp_path / "cpu")
    gpu_pipe = da.load(build_tiny("sd").to("cuda"), tmp_path / "cpu")
    assert next(gpu_pipe.unet.parameters()).device.type == "cuda"
    assert kernel in summary(gpu_pipe)
    assert _relative_error(_images(gpu_pipe), on_cpu) < 5e-2
    da.save(gpu_pipe, tmp_path / "cuda")  # saved from the GPU: the same codes, so CPU images are exact
    assert torch.equal(_images(da.load(build_tiny("sd"), tmp_path / "cuda")), on_cpu)


def test_int8_matmul_is_exact_for_any_shape():
    from diffusion_accel.quant.lower import int8_matmul

    for rows, k, n in [(154, 32, 32), (5, 64, 40), (17, 16, 8), (64, 24, 12), (154, 768, 320), (2048, 320, 1280)]:
        a = torch.randint(-128, 128, (rows, k), dtype=torch.int8, device="cuda")
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8, device="cuda")
        expected = (a.cpu().long() @ b.cpu().long()).to(torch.int32)
        assert torch.equal(int8_matmul(a, b).cpu(), expected)


def test_quantized_pipeline_moves_to_cuda_with_to():
    pipe = build_tiny("sd")
    quantize_(pipe, PTQConfig.preset("w8a8", **FAST))
    on_cpu = _images(pipe)
    assert _relative_error(_images(pipe.to("cuda")), on_cpu) < 5e-2


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 tensor cores need CUDA capability >= 8.9")
def test_fp8_scaled_mm_on_cuda_matches_simulation():
    pipe = build_tiny("flux").to("cuda")
    quantize_(pipe, PTQConfig(weights="fp8", activations="fp8", calib_kwargs=(("height", 16), ("width", 16)),
                              lower=False, **FAST))  # lower=True (the default) compared the kernel with itself
    simulated = _images(pipe, "flux")
    assert "fp8-gemm" not in summary(pipe)
    lower_(pipe)
    assert "fp8-gemm" in summary(pipe)
    assert _relative_error(_images(pipe, "flux"), simulated) < 1e-2


def test_two_four_sparse_kernels_compute_the_dense_product():
    layer = nn.Linear(256, 512).to("cuda", torch.bfloat16)
    with torch.no_grad():  # keep the 2 largest of every 4 weights of a row
        groups = layer.weight.view(512, 64, 4)
        smallest = groups.abs().argsort(dim=-1)[..., :2]
        groups.scatter_(-1, smallest, 0.0)
    model = nn.Sequential(layer)
    inputs = torch.randn(2, 1024, 256, device="cuda", dtype=torch.bfloat16)
    dense = model(inputs).float()
    cutlass_runs = torch.cuda.get_device_capability()[0] == 8
    for backend in ("auto", "cusparselt", "cutlass"):
        sparse_model = nn.Sequential(nn.Linear(256, 512).to("cuda", torch.bfloat16))
        sparse_model.load_state_dict(model.state_dict())
        text = enable_sparse_kernels(sparse_model, ["0"], "2:4", backend=backend)
        if backend == "cutlass" and not cutlass_runs:
            assert "compute capability 8.x" in text and sparse_model[0].weight.layout == torch.strided
            continue
        assert "enabled on 1 of 1" in text
        assert _relative_error(sparse_model(inputs).float(), dense) < 1e-2


def test_deepcache_on_cuda_reuses_like_on_cpu():
    config = da.DeepCacheConfig(interval=2, branch=0)
    cpu_pipe, gpu_pipe = build_tiny("sd"), build_tiny("sd").to("cuda")
    for pipe in (cpu_pipe, gpu_pipe):
        da.enable_cache(pipe, config)
    on_cpu = cpu_pipe(**tiny_call_kwargs("sd", steps=4)).images.float()
    on_gpu = gpu_pipe(**tiny_call_kwargs("sd", steps=4)).images.float().cpu()
    assert cache_summary(gpu_pipe)["reused_calls"] == cache_summary(cpu_pipe)["reused_calls"] > 0
    assert _relative_error(on_gpu, on_cpu) < 1e-3


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_quantized_pipeline_cast_to_bf16_on_cuda_round_trips_exactly(tmp_path, preset):
    pipe = quantize_(build_tiny("sd").to("cuda"), PTQConfig.preset(preset, **FAST)).to(torch.bfloat16)
    codes = {name: buf.dtype for name, buf in pipe.unet.named_buffers() if buf.dtype in (torch.int8, torch.uint8)}
    assert codes, "the lowered UNet holds integer codes"
    images = _images(pipe)
    da.save(pipe, tmp_path / "bf16")
    loaded = da.load(build_tiny("sd").to("cuda", torch.bfloat16), tmp_path / "bf16")
    assert {name: buf.dtype for name, buf in loaded.unet.named_buffers() if name in codes} == codes
    assert loaded.unet.dtype == torch.bfloat16 and torch.equal(_images(loaded), images)


def test_int4_weight_only_linears_run_tinygemm_in_bf16_and_match_the_dequantize_path(tmp_path):
    """W4A16 on CUDA: Linear layers whose segments fit a tinygemm group size run torch._weight_int4pack_mm
    on the same codes (bf16 scales), survive moves to CPU and back, and an artifact saved from them
    reloads with the same images."""
    import copy

    from diffusion_accel.quant.lower import StoredWeightLayer

    pipe = quantize_(build_tiny("sd").to("cuda"), PTQConfig.preset("w4a16", group_size=32, **FAST))
    pipe = pipe.to(torch.bfloat16)
    fast = [m for m in pipe.unet.modules() if isinstance(m, StoredWeightLayer) and m._tinygemm is not None]
    assert fast, "some int4 Linear layers run tinygemm"
    images = _images(pipe)
    slow = copy.deepcopy(pipe)
    for module in slow.unet.modules():
        if isinstance(module, StoredWeightLayer):
            module._tinygemm = None
    assert _relative_error(images, _images(slow)) < 2e-2
    pipe.to("cpu")
    assert all(m._tinygemm is None for m in fast)
    pipe.to("cuda")
    assert all(m._tinygemm is not None for m in fast) and torch.equal(_images(pipe), images)
    da.save(pipe, tmp_path / "w4a16")
    loaded = da.load(build_tiny("sd").to("cuda", torch.bfloat16), tmp_path / "w4a16")
    assert torch.equal(_images(loaded), images)


def test_structured_pruning_and_timestep_groups_run_on_cuda(tmp_path):
    """Paths a CPU review flagged: structured head removal indexed a CPU mask with the scores of a CUDA model,
    and timestep-group scales were looked up through a device tensor (syncs per layer)."""
    pipe = build_tiny("sd").to("cuda")
    da.prune_(pipe, da.PruneConfig(method="obs", sparsity=0.3, pattern="structured", calib_prompts=1,
                                   calib_num_steps=2))
    quantize_(pipe, PTQConfig(timestep_groups=2, **FAST))
    images = _images(pipe)
    assert torch.isfinite(images).all()
    da.save(pipe, tmp_path)
    assert torch.equal(_images(da.load(build_tiny("sd").to("cuda"), tmp_path)), images)


def test_an_artifact_spec_loaded_onto_cuda_is_lowered_for_cuda(tmp_path):
    """load_pipeline applied the artifact on the CPU and moved the pipeline after: layers got the CPU's kernels."""
    from diffusion_accel.loading import load_pipeline

    da.save(quantize_(load_pipeline("tiny:sd"), PTQConfig.preset("w8a8", **FAST)), tmp_path)
    by_spec = load_pipeline(str(tmp_path), device="cuda")
    assert summary(by_spec) == summary(da.load(build_tiny("sd").to("cuda"), tmp_path))
    assert "int8-gemm" in summary(by_spec)


def test_a_2_4_pruned_pipeline_saved_with_sparse_kernels_loads_with_them(tmp_path):
    from diffusion_accel.prune import PruneConfig, prune_

    pipe = prune_(build_tiny("sd").to("cuda", torch.bfloat16), PruneConfig(method="magnitude", pattern="2:4"))
    sparse = lambda p: sum(type(m.weight).__name__.startswith("SparseSemiStructured")  # noqa: E731
                           for m in p.unet.modules() if isinstance(m, nn.Linear))
    assert sparse(pipe) > 0
    da.save(pipe, tmp_path)
    loaded = da.load(build_tiny("sd").to("cuda", torch.bfloat16), tmp_path)
    assert sparse(loaded) == sparse(pipe) and torch.equal(_images(loaded), _images(pipe))


def test_clip_score_on_the_gpu_matches_the_cpu():
    """The images went to the GPU, the metric's score states stayed on the CPU (a device-mismatch error)."""
    from diffusion_accel.eval.clip_score import clip_metric, clip_score

    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a sneaker", "a bag", "a dress", "a shirt"]
    from diffusion_accel import zoo

    metric = clip_metric(zoo.bundled_clip())  # the GPU machine reaches no hub: the default CLIP cannot load there
    on_cpu = clip_score(images, prompts, model=metric)
    assert clip_score(images, prompts, model=metric, device="cuda") == pytest.approx(on_cpu, abs=0.05)
