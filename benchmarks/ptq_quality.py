"""Post-training quantization quality on fashion-sd (issue #4): ours vs naive PTQ, diffusers'
TorchAoConfig (data-free int8 weight-only / dynamic) and optimum-quanto W8A8, plus ablations.

    python benchmarks/ptq_quality.py                      # headline variants, then ablations
    python benchmarks/ptq_quality.py --only ours_w8a8 naive_w8a8

Same 2,000 prompts and seeds for every variant, the fp32 baseline's images as the PSNR reference.
Ours: activation ranges calibrated uniformly over the 50-step CFG trajectory (Q-Diffusion), MSE
range search, split-shortcut quantization, lowered to real int8 kernels (int4 weights packed);
W4A8 adds block reconstruction (AdaRound). Naive: min-max ranges from one timestep, max weight
scales, no split, no reconstruction. The ablations change one thing of ours at W4A8.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch

from diffusion_accel import PTQConfig, quantize_, zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_harness import RESULTS, Variant, run_variants_cli  # noqa: E402

MODEL = "fashion-sd"
STEPS, GUIDANCE = 50, 5.0
SINGLE_STEP = (STEPS - 1,)  # the naive baseline calibrates at the last step (closest to the data)
CALIB = dict(calib_prompts=16, calib_num_steps=STEPS, calib_steps="uniform:10", calib_guidance_scale=GUIDANCE)
RECON = dict(reconstruct=True, recon_iters=300, recon_samples=64, recon_batch=8)


def ours(bits: str, **changes: Any) -> PTQConfig:
    """Our recipe at ``bits`` ("w8a8"/"w4a8") with one-off ``changes`` (ablations)."""
    extra = RECON if bits == "w4a8" else {}
    return PTQConfig.preset(bits, act_method="mse", **CALIB, **extra).with_(**changes)


def naive(bits: str) -> PTQConfig:
    """Min-max at one timestep, max weight scales, no split shortcut, no reconstruction."""
    return PTQConfig.preset(bits, weight_scale="max", act_method="minmax", split_shortcut=False,
                            **{**CALIB, "calib_steps": SINGLE_STEP})


def ours_pipe(config: PTQConfig) -> Callable[[], Any]:
    def build() -> Any:
        pipe = zoo.load(MODEL)
        pipe.set_progress_bar_config(disable=True)
        quantize_(pipe, config)
        pipe._bench_info = {"ptq_config": config.to_dict()}
        return pipe
    return build


def torchao_pipe(kind: str) -> Callable[[], Any]:
    """diffusers' TorchAoConfig on the UNet (torchao quantizes its Linear layers; convs stay fp32)."""
    def build() -> Any:
        from diffusers import TorchAoConfig, UNet2DConditionModel
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

        quant = Int8WeightOnlyConfig() if kind == "int8wo" else Int8DynamicActivationInt8WeightConfig()
        pipe = zoo.load(MODEL)
        pipe.unet = UNet2DConditionModel.from_pretrained(zoo.path(MODEL) / "unet", torch_dtype=torch.float32,
                                                         quantization_config=TorchAoConfig(quant))
        pipe._bench_info = {"quantized": "torch.nn.Linear layers only (torchao's default filter)"}
        return pipe
    return build


def quanto_pipe() -> Any:
    """optimum-quanto W8A8 (qint8 weights and activations), calibrated with quanto's Calibration
    context on the same 16 prompts × 50 CFG steps as ours, then frozen."""
    import optimum.quanto as quanto

    from diffusion_accel.prompts import for_pipeline

    pipe = zoo.load(MODEL)
    pipe.set_progress_bar_config(disable=True)
    quanto.quantize(pipe.unet, weights=quanto.qint8, activations=quanto.qint8)
    with quanto.Calibration(), torch.no_grad():
        pipe(for_pipeline(pipe, limit=CALIB["calib_prompts"]), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
             generator=torch.Generator().manual_seed(0))
    quanto.freeze(pipe.unet)
    return pipe


def variants() -> list[Variant]:
    """Headline comparisons first, then the W4A8 ablations."""
    return [
        Variant("ours_w8a8", ours_pipe(ours("w8a8")), "W8A8", "uniform-timestep MSE ranges, split shortcut, lowered int8"),
        Variant("naive_w8a8", ours_pipe(naive("w8a8")), "W8A8", "min-max at one timestep (last), no split"),
        Variant("quanto_w8a8", quanto_pipe, "W8A8", "optimum-quanto qint8/qint8, its calibration, same prompts"),
        Variant("torchao_int8_dynamic", torchao_pipe("int8dq"), "W8A8", "diffusers TorchAoConfig, data-free, Linear only"),
        Variant("torchao_int8_weight_only", torchao_pipe("int8wo"), "W8A16", "diffusers TorchAoConfig, data-free, Linear only"),
        Variant("ours_w4a8", ours_pipe(ours("w4a8")), "W4A8", "as W8A8 + int4 MSE weights + AdaRound reconstruction"),
        Variant("naive_w4a8", ours_pipe(naive("w4a8")), "W4A8", "min-max at one timestep (last), no split"),
        Variant("ablation_w4a8_single_timestep", ours_pipe(ours("w4a8", calib_steps=SINGLE_STEP)), "ablation",
                "ours W4A8 calibrated at the last step only"),
        Variant("ablation_w4a8_no_split", ours_pipe(ours("w4a8", split_shortcut=False)), "ablation",
                "ours W4A8 without split-shortcut quantization"),
        Variant("ablation_w4a8_no_reconstruction", ours_pipe(ours("w4a8", reconstruct=False)), "ablation",
                "ours W4A8 without reconstruction"),
        Variant("ablation_w4a8_timestep_groups4", ours_pipe(ours("w4a8", timestep_groups=4)), "ablation",
                "ours W4A8 with 4 per-timestep-group activation scales"),
    ]


def main(argv: list[str] | None = None) -> dict:
    return run_variants_cli("ptq_quality.py", __doc__, "PTQ quality on fashion-sd", variants,
                            RESULTS / "ptq_quality.json", MODEL, argv=argv)


if __name__ == "__main__":
    main()
