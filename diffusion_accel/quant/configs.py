"""``PTQConfig``: what to quantize and how, validated up front with errors naming the accepted values."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..calib.ranges import RANGE_METHODS
from ..calib.schedule import select_steps
from ..scalars import is_finite_number, json_form, plain_scalars
from .formats import ACTIVATION_FORMATS, WEIGHT_FORMATS, get_format

# calibrate() arguments quantize_'s own calibration sets from the config (quant/calibrate.py's _run)
SELF_CALIBRATION_ARGUMENTS = ("pipe", "prompts", "num_samples", "num_inference_steps", "collectors", "steps",
                              "guidance_scale", "store_trajectory", "progress")
WEIGHT_GRANULARITIES = ("per_channel", "group")
GROUP_SIZES = (32, 64, 128, 256)
WEIGHT_SCALE_METHODS = ("max", "mse", "output_mse")
WEIGHT_ROUNDINGS = ("nearest", "gptq")
ACT_MODES = ("static", "dynamic", "dynamic_per_tensor")
GPTQ_GROUP_SCALES = ("lazy", "static")
FLAGS = ("act_symmetric", "split_shortcut", "keep_high_precision", "reconstruct", "lower", "gptq_act_order")


@dataclass(frozen=True)
class PTQConfig:
    """Timestep-aware post-training quantization of the denoiser (Q-Diffusion style).

    weights: "int8" | "int4" | "fp8" | None (keep fp). activations: "int8" | "fp8" | None (weight-only).
    weight_granularity: "per_channel" (symmetric, one scale per output channel) or "group"
    (``group_size`` input columns per scale). weight_scale: "max", "mse" (clipping search on the
    weight error) or "output_mse" (the same search weighted by each input feature's calibrated mean
    square).
    weight_rounding: "nearest" or "gptq" (codes chosen column by column against each layer's input
    Hessian, collected in ``gptq_groups`` calibration sweeps, more where a group's Hessians would exceed a
    quarter of the device's memory; ``gptq_damp`` is relative to mean(diag H); ``gptq_blocksize`` columns
    are rounded per block before the rest are updated, GPTQ's lazy batch).
    gptq_group_scales: "lazy" (each later scale segment, a weight group or split-shortcut half, gets its
    scale when the GPTQ sweep reaches it, from the weights as compensation left them) or "static"
    (every scale fitted to the original weights first). gptq_act_order: round the columns in order of
    decreasing Hessian diagonal (GPTQ's act_order: the inputs with the most energy first); the sweep then
    runs out of column order, so it needs gptq_group_scales="static".
    act_mode: "static" (per-tensor scale from calibration), "dynamic" (per-token scales at run time) or
    "dynamic_per_tensor" (one scale per layer call, per split-shortcut half, from that call's min / max:
    no range calibration, and it still lowers to int8 GEMMs and oneDNN int8 convs, which take the
    activation scale at call time).
    act_method: how static ranges are set ("minmax", "percentile" at ``act_percentile`` in (50, 100],
    "mse"). act_symmetric: False =
    asymmetric with a zero point. timestep_groups: K > 1 gives K activation scales over the
    trajectory, chosen at run time by the call's timestep against the calibrated bounds (by step position
    without them). split_shortcut: separate scales for the two
    channel halves of UNet skip concatenations. include/exclude: fnmatch globs on layer names.
    act_exclude: globs of quantized layers whose input activations stay in floating point while their
    weights are still quantized (per-layer mixed precision, e.g. ``("*conv_shortcut",)`` for the UNet
    layers fed by raw skip concatenations); each pattern must match at least one quantized layer.
    keep_high_precision: keep the adapter's high-precision layers (conv_in, embeddings, conv_out).
    calib_*: used only when ``quantize_`` runs the calibration itself. reconstruct: AdaRound/BRECQ
    block reconstruction with ``recon_iters`` rounding iterations per block (Adam at ``recon_lr``; the
    first ``recon_act_iters`` iterations also learn the activation step sizes, at ``recon_act_lr``), on
    ``recon_samples`` stored block calls in batches of ``recon_batch`` (all blocks' samples together at most
    ``recon_max_bytes`` of CPU memory, shared by sample count; a warning names blocks left fewer); loss: the block outputs' mean
    |error|^``recon_p`` plus, after the first ``recon_warmup`` fraction (in [0, 1)) of the iterations,
    ``recon_reg`` times the rounding regulariser, its exponent annealed from ``recon_beta[0]`` to
    ``recon_beta[1]``. lower: turn the calibrated
    layers into real int8 / packed int4 layers at the end. attention: "int8" | "fp8" | None quantizes
    the attention matmul inputs (Q, K, V dynamic, one scale per batch row) and the softmax output on an unsigned
    ``softmax_bits`` grid, through processors for UNet/DiT, SD3 and Flux attention (simulated).
    """

    weights: str | None = "int8"
    activations: str | None = "int8"
    weight_granularity: str = "per_channel"
    group_size: int = 128
    weight_scale: str = "max"
    weight_rounding: str = "nearest"
    gptq_damp: float = 0.01
    gptq_blocksize: int = 128
    gptq_groups: int = 4
    gptq_group_scales: str = "lazy"
    gptq_act_order: bool = False
    act_mode: str = "static"
    act_method: str = "minmax"
    act_percentile: float = 99.99
    act_symmetric: bool = False
    timestep_groups: int = 1
    split_shortcut: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    act_exclude: tuple[str, ...] = ()
    keep_high_precision: bool = True
    calib_prompts: int = 4
    calib_num_steps: int = 10
    calib_steps: str | tuple[int, ...] = "uniform:5"
    calib_guidance_scale: float | None = None
    calib_kwargs: tuple[tuple[str, Any], ...] = ()
    reconstruct: bool = False
    recon_iters: int = 200
    recon_act_iters: int = 0
    recon_batch: int = 8
    recon_samples: int = 64
    recon_max_bytes: int = 1 << 30
    recon_lr: float = 1e-3
    recon_act_lr: float = 4e-4
    recon_reg: float = 0.01
    recon_beta: tuple[float, float] = (20.0, 2.0)
    recon_warmup: float = 0.2
    recon_p: float = 2.0
    lower: bool = True
    attention: str | None = None
    softmax_bits: int = 8

    def __post_init__(self) -> None:
        plain_scalars(self)
        for name in ("include", "exclude", "act_exclude"):
            if isinstance(getattr(self, name), str):  # tuple("*conv") would be globs "*", "c", ...
                raise ValueError(f"PTQConfig.{name} takes a tuple of glob strings, got the string "
                                 f"{getattr(self, name)!r}; write ({getattr(self, name)!r},)")
        for name in ("include", "exclude", "act_exclude", "calib_kwargs", "recon_beta"):
            object.__setattr__(self, name, _as_tuple(name, getattr(self, name)))
        if not isinstance(self.calib_steps, str):
            object.__setattr__(self, "calib_steps", _as_tuple("calib_steps", self.calib_steps))
        validate(self)  # values as a save / load gives them back (a tuple value was unequal to itself after one)
        object.__setattr__(self, "calib_kwargs", tuple((name, json_form(value)) for name, value in self.calib_kwargs))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "PTQConfig":
        """A named recipe ("w8a8", "w4a8", "w8a16", "fp8", "w4a16", "qdiffusion", "cpu-fast"; any case)."""
        key = name.lower() if isinstance(name, str) else None  # a list was "unhashable type" (until session 49)
        if key not in PRESETS:
            raise ValueError(f"unknown PTQ preset {name!r}; accepted: {', '.join(PRESETS)}")
        _check_fields(overrides)
        return cls(**(PRESETS[key] | overrides))

    @property
    def needs_calibration(self) -> bool:
        """True when quantization reads layer inputs (``quant.calibrate.build_collectors``: static activation ranges,
        output-MSE weight scales, block reconstruction; GPTQ's Hessians): weight-only round-to-nearest reads none."""
        return (self.activations is not None and self.act_mode == "static") or self.reconstruct \
            or self.reads_step_weights

    @property
    def reads_step_weights(self) -> bool:
        """True when the calibration steps' weights shape the result (Hessians of output-MSE scales or GPTQ)."""
        return (self.weights is not None and self.weight_scale == "output_mse") or self.weight_rounding == "gptq"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PTQConfig":
        """Inverse of ``to_dict``; unknown keys raise ValueError naming the accepted ones."""
        if not isinstance(values, dict):
            raise TypeError(f"PTQConfig.from_dict takes a dict (PTQConfig.to_dict()), got {type(values).__name__}")
        _check_fields(values)  # calib_kwargs' JSON lists become pairs in __post_init__ (a dict split its keys into
        return cls(**values)   # letters here, and a bare 5 was a TypeError naming nothing, until session 48)

    def with_(self, **changes: Any) -> "PTQConfig":
        """A validated copy with ``changes`` applied."""
        _check_fields(changes)
        return replace(self, **changes)


def _check_fields(values: dict[str, Any]) -> None:
    """ValueError naming the keys of ``values`` that are no PTQConfig field, and the accepted ones."""
    known = {f.name for f in fields(PTQConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown PTQConfig fields {unknown}; accepted: {sorted(known)}")


PRESETS: dict[str, dict[str, Any]] = {
    "w8a8": dict(weights="int8", activations="int8"),
    "w4a8": dict(weights="int4", activations="int8", weight_scale="output_mse", weight_rounding="gptq"),
    "w8a16": dict(weights="int8", activations=None),
    "fp8": dict(weights="fp8", activations="fp8", lower=True),
    "w4a16": dict(weights="int4", activations=None, weight_granularity="group", group_size=128),
    "cpu-fast": dict(weights="int8", activations="int8", calib_prompts=2, calib_num_steps=10,
                     calib_steps="uniform:5", lower=True),
    "qdiffusion": dict(weights="int4", activations="int8", weight_scale="mse", act_method="mse",
                       calib_prompts=32, calib_num_steps=50, calib_steps="uniform:25",
                       reconstruct=True, recon_iters=20000,  # guidance: the pipeline's own (SD 1.5: the paper's 7.5)
                       recon_act_iters=5000, recon_batch=8, recon_samples=256, recon_lr=1e-3,
                       recon_act_lr=4e-4, recon_reg=0.01, recon_beta=(20.0, 2.0), recon_warmup=0.2,
                       recon_p=2.4),
}


def _choice(name: str, value: Any, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"PTQConfig.{name}={value!r} is not supported; accepted: "
                         f"{', '.join(repr(a) for a in accepted)}")


def _as_tuple(name: str, value: Any) -> tuple:
    """``value`` (a list or tuple; for ``calib_kwargs`` also a dict, by its items) as a tuple, else a
    ValueError (``include=5`` was a bare TypeError, a dict was taken by its keys)."""
    if name == "calib_kwargs" and isinstance(value, dict):
        return tuple(value.items())
    if not isinstance(value, (list, tuple)):
        forms = " or a string: 'all', 'uniform:K', 'every:K'" if name == "calib_steps" else ""
        raise ValueError(f"PTQConfig.{name} takes a tuple (or list){forms}, got {value!r}")
    return tuple(tuple(item) if name == "calib_kwargs" and isinstance(item, list) else item for item in value)


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"PTQConfig.{name} must be True or False, got {value!r}")


def _finite(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """A finite number in [low, high) ((low, high) when ``low_open``), else a ValueError naming the field."""
    ok = is_finite_number(value)
    ok = ok and (value > low if low_open else value >= low) and value < high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g})"
        raise ValueError(f"PTQConfig.{name} must be a finite number in {bounds}, got {value!r}")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"PTQConfig.{name} must be an int >= {minimum}, got {value!r}")


def validate(config: PTQConfig) -> None:
    """Raise ValueError naming the bad field, its value and the accepted values."""
    _check_formats(config)
    _check_calibration_options(config)
    _check_activation_options(config)
    _check_attention(config)
    _check_reconstruction(config)
    _check_gptq(config)
    _check_storable(config)


def _check_formats(config: PTQConfig) -> None:
    """What is quantized (formats, include / exclude globs), the weight granularity and scales, the flags."""
    _choice("weights", config.weights, WEIGHT_FORMATS)
    _choice("activations", config.activations, ACTIVATION_FORMATS)
    if config.weights is None and config.activations is None and config.attention is None:
        raise ValueError("PTQConfig needs weights, activations or attention to quantize; all are None")
    _choice("weight_granularity", config.weight_granularity, WEIGHT_GRANULARITIES)
    _positive_int("group_size", config.group_size)  # 32.0 == 32 passed the choice, then failed deep inside
    _choice("group_size", config.group_size, GROUP_SIZES)
    for name in FLAGS:
        _flag(name, getattr(config, name))
    _choice("weight_scale", config.weight_scale, WEIGHT_SCALE_METHODS)
    _check_globs(config)


def _check_calibration_options(config: PTQConfig) -> None:
    """The calibration run quantize_ makes: guidance, extra call arguments, counts and the step selection."""
    if config.calib_guidance_scale is not None:
        _finite("calib_guidance_scale", config.calib_guidance_scale, 0.0)
    _check_calib_kwargs(config.calib_kwargs)
    for name in ("calib_prompts", "calib_num_steps", "recon_batch", "recon_samples", "recon_max_bytes"):
        _positive_int(name, getattr(config, name))
    for name in ("recon_iters", "recon_act_iters"):
        _positive_int(name, getattr(config, name), minimum=0)
    try:
        select_steps(config.calib_num_steps, config.calib_steps)
    except (TypeError, ValueError) as error:  # (0.0, 2.0): its TypeError named no field (until session 48)
        raise ValueError(f"PTQConfig.calib_steps={config.calib_steps!r} with calib_num_steps="
                         f"{config.calib_num_steps}: {error}") from None


def _check_activation_options(config: PTQConfig) -> None:
    """How activations are quantized (mode, range method, timestep groups, excluded layers), and only when
    they are."""
    _choice("act_mode", config.act_mode, ACT_MODES)
    _choice("act_method", config.act_method, RANGE_METHODS)
    if not isinstance(config.act_percentile, (int, float)) or not 50.0 < config.act_percentile <= 100.0:
        raise ValueError(f"PTQConfig.act_percentile must be in (50, 100], got {config.act_percentile!r}")
    _positive_int("timestep_groups", config.timestep_groups)
    if config.timestep_groups > 1 and config.act_mode != "static":
        raise ValueError(f"PTQConfig.timestep_groups > 1 needs act_mode='static', got {config.act_mode!r} "
                         "(dynamic scales are computed from each call at run time)")
    if config.activations is None and (config.timestep_groups > 1 or config.act_mode != "static"):
        raise ValueError(f"PTQConfig.timestep_groups={config.timestep_groups} / act_mode={config.act_mode!r} set how "
                         "activations are quantized, but activations=None keeps them in floating point")
    if config.act_exclude and config.activations is None:
        raise ValueError(f"PTQConfig.act_exclude={list(config.act_exclude)} keeps some layers' activations in "
                         "floating point, but activations=None already keeps all of them")


def check_calibration_choices(config: PTQConfig) -> None:
    """ValueError for settings refused where a model is calibrated anew but not in ``validate`` (artifacts saved with
    them hold what they learned and still load): an "mse" range search of fp8 activations (session 45), and
    activation-step iterations where no activation has a static scale to learn (session 46), and options with no
    effect: include / exclude globs where no weight or activation layer is quantized (attention quantization covers
    every attention module: a glob matching nothing quantized all of them), softmax_bits without attention, a
    group_size without group-wise weights (session 53)."""
    _check_range_method(config)
    if (config.include or config.exclude) and config.weights is None and config.activations is None:
        raise ValueError(f"PTQConfig.include / exclude select weight and activation layers, but weights=None and "
                         f"activations=None quantize none (attention={config.attention!r} covers every attention "
                         f"module); drop them")
    if config.weight_granularity != "group" and config.group_size != PTQConfig.group_size:
        raise ValueError(f"PTQConfig.group_size={config.group_size} sets the input columns per scale of "
                         f"weight_granularity='group', but weight_granularity={config.weight_granularity!r} keeps one "
                         f"scale per output channel (the size was ignored); set weight_granularity='group' or drop it")
    if config.attention is None and config.softmax_bits != PTQConfig.softmax_bits:
        raise ValueError(f"PTQConfig.softmax_bits={config.softmax_bits} sets the softmax output's bits of attention "
                         f"quantization, which attention=None turns off; set attention (e.g. 'int8') or drop it")
    learns_scales = config.activations is not None and config.act_mode == "static"
    if config.reconstruct and config.recon_act_iters > 0 and not learns_scales:
        raise ValueError(f"PTQConfig.recon_act_iters={config.recon_act_iters} learns static activation scales, but "
                         f"activations={config.activations!r} / act_mode={config.act_mode!r} has none to learn (the "
                         f"iterations ran and changed nothing); set recon_act_iters=0")


def _check_range_method(config: PTQConfig) -> None:
    """An "mse" range search of fp8 activations is refused."""
    if config.act_method == "mse" and config.activations is not None and get_format(config.activations).is_float:
        raise ValueError(f"PTQConfig.act_method='mse' clips a range to the least quantization error, which an fp8 "
                         f"grid (activations={config.activations!r}) gets by clipping outliers its relative precision "
                         f"does not need to lose (fashion-sd fp8: 25.1 dB mse vs 27.1 minmax); use act_method='minmax'")


def _check_attention(config: PTQConfig) -> None:
    """Attention-score quantization: its format and softmax bits."""
    _choice("attention", config.attention, ACTIVATION_FORMATS)
    if isinstance(config.softmax_bits, bool) or not isinstance(config.softmax_bits, int) \
            or not 2 <= config.softmax_bits <= 16:
        raise ValueError(f"PTQConfig.softmax_bits must be an int in [2, 16], got {config.softmax_bits!r}")


def _check_calib_kwargs(pairs: tuple) -> None:
    """(name, value) pairs with string names (a dict's items, as ``from_dict`` gives them), none of them an
    argument ``quantize_``'s calibration sets from the config (``num_inference_steps`` there was a 'multiple
    values' TypeError inside quantize_); other ``calibrate`` arguments (Flux's ``negative_prompt``, ``seed``)
    and pipeline arguments pass on."""
    if not all(isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) for pair in pairs):
        raise ValueError(f"PTQConfig.calib_kwargs takes (name, value) pairs, e.g. (('height', 32),); got {pairs!r}")
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # dict(pairs) kept the last value silently
        raise ValueError(f"PTQConfig.calib_kwargs sets {repeated} more than once; give each argument once")
    own = sorted(set(dict(pairs)) & set(SELF_CALIBRATION_ARGUMENTS))
    if own:
        raise ValueError(f"PTQConfig.calib_kwargs may not set {own}: quantize_'s own calibration sets them; use "
                         f"calib_num_steps, calib_steps, calib_prompts and calib_guidance_scale (or pass a Calibration)")


def _check_storable(config: PTQConfig) -> None:
    """Every field can be written to the artifact's JSON manifest (a numpy int in calib_kwargs or a NaN /
    numpy recon_lr quantized, then ``save`` refused, or wrote non-standard JSON)."""
    for name, value in config.to_dict().items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(f"PTQConfig.{name}={value!r} cannot be stored in the artifact manifest (JSON); pass plain "
                             f"values (int, float, str, bool, None, lists / dicts of them), finite numbers") from None


def _check_globs(config: PTQConfig) -> None:
    for name in ("include", "exclude", "act_exclude"):
        for pattern in getattr(config, name):
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"PTQConfig.{name} holds glob strings; got {pattern!r}")


def _check_reconstruction(config: PTQConfig) -> None:
    """The reconstruction settings, also when ``reconstruct=False`` (the manifest records them: a string
    ``recon_lr`` was saved as it was)."""
    _finite("recon_warmup", config.recon_warmup, 0.0, 1.0)
    for name in ("recon_lr", "recon_act_lr", "recon_p"):
        _finite(name, getattr(config, name), 0.0, low_open=True)
    _finite("recon_reg", config.recon_reg, 0.0)
    ok = len(config.recon_beta) == 2 and all(is_finite_number(b) and b > 0 for b in config.recon_beta)
    if not ok:
        raise ValueError(f"PTQConfig.recon_beta must be (start, end), two finite numbers > 0, got {config.recon_beta!r}")
    if config.reconstruct and config.weights not in ("int8", "int4"):
        raise ValueError(f"PTQConfig.reconstruct=True needs integer weights ('int8' or 'int4'); "
                         f"got weights={config.weights!r}")


def _check_gptq(config: PTQConfig) -> None:
    _choice("weight_rounding", config.weight_rounding, WEIGHT_ROUNDINGS)
    _positive_int("gptq_blocksize", config.gptq_blocksize)
    _positive_int("gptq_groups", config.gptq_groups)
    _choice("gptq_group_scales", config.gptq_group_scales, GPTQ_GROUP_SCALES)
    _finite("gptq_damp", config.gptq_damp, 0.0, low_open=True)
    if config.weight_rounding != "gptq":
        if config.gptq_act_order:
            raise ValueError(f"PTQConfig.gptq_act_order=True orders GPTQ's sweep; it needs weight_rounding='gptq', "
                             f"got {config.weight_rounding!r}")
        return
    if config.weights not in ("int8", "int4"):
        raise ValueError(f"PTQConfig.weight_rounding='gptq' needs integer weights ('int8' or 'int4'); "
                         f"got weights={config.weights!r}")
    if config.gptq_act_order and config.gptq_group_scales != "static":
        raise ValueError("PTQConfig.gptq_act_order=True rounds columns out of order, so scales cannot be fitted "
                         "lazily as the sweep reaches them; set gptq_group_scales='static'")
    if config.reconstruct:
        raise ValueError("PTQConfig.weight_rounding='gptq' and reconstruct=True both choose the weight "
                         "rounding (AdaRound restarts from the float weights); use one of them")
