"""PTQ speed and size on the full-size SD 1.5 UNet (random weights) at 256 x 256, batch 2 (CFG),
or on a zoo pipeline's denoiser (``--model fashion-sd``: real weights and real denoiser inputs).

    python benchmarks/ptq_speed.py [--repeats 5] [--no-compile] [--threads 2]
    python benchmarks/ptq_speed.py --model fashion-sd --out benchmarks/results/ptq_speed_fashion-sd.json
    python benchmarks/ptq_speed.py --model fashion-sd --size-only --out benchmarks/results/ptq_size_fashion-sd.json

Denoiser-only latency, median of ``repeats`` after warm-up, every variant timed in this process:
fp32 eager, fp32 ``torch.compile``, bf16 eager (``--no-bf16`` skips it), W8A8 lowered eager and compiled
(``--act-modes static dynamic_per_tensor`` also times dynamic per-tensor activations on a fresh base). Calibration runs a
real StableDiffusionPipeline around the full-size UNet (tiny text encoder with 768-wide states,
tiny 8x VAE) for one prompt, 2 steps, CFG. Sizes: the fp32 UNet's safetensors bytes vs the PTQ
artifact plus the base tensors it does not replace (what a standalone quantized checkpoint holds).
Writes JSON + Markdown to ``benchmarks/results/ptq_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from cli_options import COUNT, report_path
from diffusers import StableDiffusionPipeline

from diffusion_accel import zoo
from diffusion_accel.artifact import save
from diffusion_accel.eval.machine import machine_info
from diffusion_accel.eval.pipes import denoiser_of
from diffusion_accel.eval.timing import time_callable
from diffusion_accel.quant import PTQConfig, lower_, quantize_, summary
from diffusion_accel.quant.state import get_state
from diffusion_accel.testing.fullsize import build_fullsize
from diffusion_accel.testing.tiny import _sd_scheduler, tiny_clip_text, tiny_vae
from diffusion_accel.testing.tokenizers import clip_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
RESOLUTION, BATCH = 256, 2


def sd15_pipeline(**unet_overrides: Any) -> tuple[StableDiffusionPipeline, Callable[..., dict[str, Any]]]:
    """A StableDiffusionPipeline around the full-size SD 1.5 UNet (config ``unet_overrides`` applied,
    e.g. smaller blocks for a smoke run), and the UNet's input maker."""
    unet, make_inputs = build_fullsize("sd15", **unet_overrides)
    vae = tiny_vae(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=tiny_clip_text(hidden=unet.config.cross_attention_dim,
                                                                        projection_dim=unet.config.cross_attention_dim),
                                   tokenizer=clip_tokenizer(), unet=unet, scheduler=_sd_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, make_inputs


def time_denoiser(module: torch.nn.Module, inputs: dict[str, Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median / min latency (ms) of one denoiser call; warm-up time (compile included) reported too."""
    start = time.perf_counter()
    with torch.inference_mode():
        stats = time_callable(lambda: module(**inputs), warmup=warmup, repeats=repeats)
    return {"median_ms": stats.median_ms, "p10_ms": stats.p10_ms, "p90_ms": stats.p90_ms,
            "total_s_incl_warmup": time.perf_counter() - start}


def state_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of every state-dict tensor of ``module`` (no copies kept)."""
    return {k: t.numel() * t.element_size() for k, t in module.state_dict().items()}


BASE_SAMPLE = "base-sample.safetensors"  # save's sample of the base's weights, to recognise it: no denoiser part


def artifact_size(pipe: Any, base_state: dict[str, int]) -> dict[str, float]:
    """Sizes vs the fp32 denoiser's tensor bytes: the artifact's technique files (tensors with their safetensors
    headers) and manifest.json, and standalone = those + the base tensors they do not replace (what a quantized
    checkpoint holds); tensors = the tensor bytes alone (codes, scales, zero points, kept base tensors: no headers,
    no manifest). The base-sample file is reported, not counted (until session 52 it was, in an "artifact" the table
    called the PTQ file only)."""
    layers = set(get_state(denoiser_of(pipe)).layers)
    kept = sum(v for k, v in base_state.items() if not (k.endswith(".weight") and k[:-7] in layers))
    with tempfile.TemporaryDirectory() as folder:
        save(pipe, folder)
        files = {f.name: f.stat().st_size for f in Path(folder).iterdir()}
        tensor_bytes = sum(tensor_payload(f) for f in Path(folder).glob("*.safetensors") if f.name != BASE_SAMPLE)
    artifact = sum(size for name, size in files.items() if name != BASE_SAMPLE)
    fp32 = sum(base_state.values())
    return {"artifact_mb": artifact / 2**20, "standalone_mb": (artifact + kept) / 2**20, "fp32_mb": fp32 / 2**20,
            "standalone_ratio": (artifact + kept) / fp32, "artifact_ratio": artifact / fp32,
            "tensors_ratio": (tensor_bytes + kept) / fp32, "files": files}


def tensor_payload(path: Path) -> int:
    """Bytes of the tensors in a safetensors file: the file less its 8-byte length field and JSON header."""
    with path.open("rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
    return path.stat().st_size - 8 - header_length


def weight_only_size(make_pipe: Callable[[], Any], config: PTQConfig, base_state: dict[str, int]) -> dict[str, float]:
    """Size of a weight-only quantized copy (no calibration needed)."""
    pipe = make_pipe()
    quantize_(pipe, config)
    return artifact_size(pipe, base_state)


def sd15_target(batch_prompts: int) -> tuple[Any, Callable[[], Any], dict[str, Any], PTQConfig]:
    """(pipe, fresh-pipe maker, UNet inputs at 256 px with CFG batch 2, W8A8 config)."""
    pipe, make_inputs = sd15_pipeline()
    config = PTQConfig(weights="int8", activations="int8", calib_prompts=1, calib_num_steps=2, calib_steps="all",
                       calib_guidance_scale=7.5, calib_kwargs=(("height", RESOLUTION), ("width", RESOLUTION)))
    return pipe, lambda: sd15_pipeline()[0], make_inputs(BATCH, RESOLUTION), config


@torch.no_grad()
def captured_inputs(pipe: Any, call_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs of the denoiser's first call inside ``pipe(**call_kwargs)`` (cloned)."""
    captured: dict[str, Any] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not captured:
            captured.update(inspect.signature(module.forward).bind(*args, **kwargs).arguments)

    handle = denoiser_of(pipe).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(**call_kwargs, num_inference_steps=1, output_type="latent")
    finally:
        handle.remove()
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in captured.items() if v is not None}


def zoo_target(name: str, batch_prompts: int) -> tuple[Any, Callable[[], Any], dict[str, Any], PTQConfig]:
    """(zoo pipe, fresh-pipe maker, the denoiser's real inputs for ``batch_prompts`` prompts, W8A8 config
    calibrated as the quality benchmark does: 16 prompts, 10 uniform steps of the sampling trajectory)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ptq_quality import calib_fields
    from zoo_quality import DEFAULTS, prompts_for

    def make() -> Any:
        pipe = zoo.load(name)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe = make()
    call = {k: v for k, v in DEFAULTS[name].items() if k != "num_inference_steps"}
    inputs = captured_inputs(pipe, {"prompt": prompts_for(batch_prompts, 0)[0], **call})
    return pipe, make, inputs, PTQConfig.preset("w8a8", act_method="mse", **calib_fields(name))


def compiled_note(results: dict[str, Any], compiled_ms: float | None) -> str:
    """"(compiled: N)" where compiled variants were timed (a --no-compile run said it too)."""
    return f"(compiled: {results['compiled_repeats']})" if compiled_ms else "(no compiled variants)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    if args.model == "sd15":
        pipe, make_pipe, inputs, config = sd15_target(BATCH)
    else:
        pipe, make_pipe, inputs, config = zoo_target(args.model, args.batch_prompts)
    denoiser = denoiser_of(pipe)
    base_state = state_bytes(denoiser)
    sizes = {"w4a16_per_channel": weight_only_size(make_pipe, PTQConfig(weights="int4", activations=None), base_state),
             "w4a16_group128": weight_only_size(make_pipe, PTQConfig(weights="int4", activations=None,
                                                                     weight_granularity="group", group_size=128),
                                                base_state)}
    results: dict[str, Any] = {"machine": machine_info(), "load_average_start": os.getloadavg(),
                               "model": args.model, "inputs": {k: list(v.shape) for k, v in inputs.items()
                                                               if isinstance(v, torch.Tensor)},
                               "resolution": RESOLUTION if args.model == "sd15" else 32,
                               "batch": BATCH if args.model == "sd15" else args.batch_prompts, "repeats": args.repeats,
                               "compiled_repeats": args.compiled_repeats, "latency": {}, "size": sizes}
    if args.size_only:  # the W8A8 artifact too (a calibrated quantize_), no timing
        quantized_denoiser(pipe, config, results, "static")
        sizes["w8a8"] = artifact_size(pipe, base_state)
        return results
    lat = results["latency"]
    partial = args.out.with_suffix(".partial.json")  # checkpoint of a run in progress (git-ignored)
    partial.parent.mkdir(parents=True, exist_ok=True)

    def record(name: str, module: torch.nn.Module, module_inputs: dict, repeats: int) -> None:
        """Time ``module``, print it and checkpoint the partial results (a long run may be killed)."""
        lat[name] = time_denoiser(module, module_inputs, repeats)
        print(name, lat[name], flush=True)
        partial.write_text(json.dumps(results, indent=2, default=str))

    record("fp32_eager", denoiser, inputs, args.repeats)
    if not args.no_compile:
        record("fp32_compiled", torch.compile(denoiser), inputs, args.compiled_repeats)
        torch._dynamo.reset()
    if not args.no_bf16:
        bf16 = copy.deepcopy(denoiser).to(torch.bfloat16)
        record("bf16_eager", bf16, {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point()
                                    else v for k, v in inputs.items()},
               args.repeats)
        del bf16
    for index, act_mode in enumerate(args.act_modes):
        if index:
            pipe = make_pipe()  # a fresh base for every activation mode
        denoiser = quantized_denoiser(pipe, config.with_(act_mode=act_mode), results, act_mode)
        if "w8a8" not in results["size"]:
            results["size"]["w8a8"] = artifact_size(pipe, base_state)
        label = "w8a8" if act_mode == "static" else f"w8a8_{act_mode}"
        record(f"{label}_lowered_eager", denoiser, inputs, args.repeats)
        if not args.no_compile:
            record(f"{label}_lowered_compiled", torch.compile(denoiser), inputs, args.compiled_repeats)
            torch._dynamo.reset()
        del pipe, denoiser
        gc.collect()
    results["load_average_end"] = os.getloadavg()
    return results


def quantized_denoiser(pipe: Any, config: PTQConfig, results: dict[str, Any], act_mode: str) -> torch.nn.Module:
    """Quantize and lower ``pipe``; records quantize time and summary (per activation mode)."""
    gc.collect()
    start = time.perf_counter()
    quantize_(pipe, config)
    gc.collect()
    lower_(pipe)  # after quantize_ returned, so the fp32 originals are already freed
    suffix = "" if act_mode == "static" else f"_{act_mode}"
    results[f"quantize_s{suffix}"] = time.perf_counter() - start
    results[f"summary{suffix}"] = summary(pipe)
    print(results[f"summary{suffix}"], flush=True)
    return denoiser_of(pipe)


def markdown(results: dict[str, Any]) -> str:
    """A Markdown table of latencies (with ratios to fp32 eager / compiled) and sizes."""
    if not results["latency"]:
        return size_markdown(results)
    lat = results["latency"]
    base, compiled = lat["fp32_eager"]["median_ms"], lat.get("fp32_compiled", {}).get("median_ms")
    m = results["machine"]
    title = ("SD 1.5 UNet (random weights)" if results.get("model", "sd15") == "sd15"
             else f"{results['model']} denoiser (zoo weights, real inputs {results['inputs']})")
    batch = (f"batch {results['batch']}" if results.get("model", "sd15") == "sd15"  # the denoiser's (CFG included)
             else f"{results['batch']} prompts per call (denoiser batch {next(iter(results['inputs'].values()))[0]})")
    lines = [f"# PTQ speed: {title}, {results['resolution']} px, {batch}",
             "", f"CPU {m['cpu_model']} ({m.get('cpu_features', 'features not recorded')}), {m['cpu_cores_available']} cores, torch threads {m['torch_threads']}, "
             f"torch {m.get('torch_version')}; load average {results['load_average_start']} -> "
             f"{results['load_average_end']} (a high load average means the cores were shared); median of {results['repeats']} "
             f"{compiled_note(results, compiled)} after 1 warm-up (the compiled warm-up includes compilation).", "", "| variant | median ms | vs fp32 eager | vs fp32 compiled |", "|---|---|---|---|"]
    for name, item in lat.items():
        ratio_c = f"{compiled / item['median_ms']:.2f}x" if compiled else "-"
        lines.append(f"| {name} | {item['median_ms']:.0f} | {base / item['median_ms']:.2f}x | {ratio_c} |")
    if "bf16_eager" not in lat:
        lines += ["", "bf16 eager not timed (`--no-bf16`: this CPU emulates bf16)."]
    lines += size_lines(results)
    for suffix, title in (("", "Static activations"), ("_dynamic_per_tensor", "Dynamic per-tensor activations "
                                                                                "(no range calibration)")):
        if f"summary{suffix}" in results:  # the modes --act-modes ran (static alone was assumed: KeyError)
            lines += ["", f"{title}; quantize time {results[f'quantize_s{suffix}']:.0f} s:", "", "```",
                      results[f"summary{suffix}"], "```"]
    return "\n".join(lines) + "\n"


def size_markdown(results: dict[str, Any]) -> str:
    """The size table of a --size-only run."""
    m = results["machine"]
    lines = [f"# PTQ size: {results['model']} denoiser", "", f"CPU {m['cpu_model']}, torch {m.get('torch_version')}; "
             f"W8A8 calibrated as the speed run does (quantize time {results['quantize_s']:.0f} s)."]
    return "\n".join(lines + size_lines(results) + ["", "```", results["summary"], "```"]) + "\n"


def size_lines(results: dict[str, Any]) -> list[str]:
    lines = ["", "| weights | artifact MiB | standalone MiB | standalone / fp32 | tensors alone / fp32 |",
             "|---|---|---|---|---|"]
    for name, size in results["size"].items():
        tensors = f"{size['tensors_ratio']:.3f}" if "tensors_ratio" in size else "not recorded"
        lines.append(f"| {name} | {size['artifact_mb']:.1f} | {size['standalone_mb']:.1f} | "
                     f"{size['standalone_ratio']:.3f} | {tensors} |")
    lines += ["", f"fp32 denoiser: {results['size']['w8a8']['fp32_mb']:.1f} MiB of tensors (artifact = the PTQ "
              "safetensors file with its header + manifest.json, not the base-sample file that recognises the base; "
              "standalone = artifact + the base tensors it does not replace; tensors alone = codes, scales, zero "
              "points and kept base tensors, no headers or manifest)."]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--repeats", type=COUNT, default=5)
    parser.add_argument("--compiled-repeats", type=COUNT, default=3)
    parser.add_argument("--threads", type=COUNT, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip bf16 eager (CPUs without AVX512-BF16/AMX emulate bf16: minutes per call here)")
    parser.add_argument("--model", choices=["sd15", "fashion-sd", "fashion-flux"], default="sd15")
    parser.add_argument("--act-modes", nargs="+", default=["static"], choices=["static", "dynamic_per_tensor"],
                        help="W8A8 activation modes to time (each quantizes a fresh base)")
    parser.add_argument("--batch-prompts", type=COUNT, default=32,
                        help="zoo models: prompts per call (fashion-sd's CFG doubles the denoiser batch; "
                             "fashion-flux's true CFG calls the branches apart)")
    parser.add_argument("--size-only", action="store_true", help="sizes alone (int4 weight-only, calibrated W8A8)")
    parser.add_argument("--out", type=report_path, default=RESULTS / "ptq_speed.json", help="JSON (Markdown beside it)")
    args = parser.parse_args(argv)
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    args.out.with_suffix(".md").write_text(markdown(results))
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)  # the run finished: its checkpoint is done
    print(markdown(results))


if __name__ == "__main__":
    main()
