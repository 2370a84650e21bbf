"""``PruneConfig``: what to prune, how, and how to calibrate; validated on construction."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..calib.schedule import WEIGHTING_SCHEMES
from ..scalars import is_finite_number, json_form, plain_scalars

METHODS = ("obs", "wanda", "magnitude")
PATTERNS = ("unstructured", "structured", "2:4", "4:8", "any 'N:M' with 0 < N < M")
STRUCTURED_METHODS = ("obs", "magnitude")
SCOPES = ("layer", "global")
ALLOCATIONS = ("error", "saliency")
DEFAULT_SPARSITY = 0.5
FLAGS = ("keep_last_block_dense", "prune_heads", "prune_ffn", "prune_resnets", "sparse_kernels")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """``(N, M)`` for an "N:M" pattern (at most N non-zeros in every M inputs), else None."""
    match = _NM.match(pattern)
    if match is None:
        return None
    keep, group = int(match.group(1)), int(match.group(2))
    if not 0 < keep < group:
        raise ValueError(f"pattern {pattern!r}: N:M sparsity needs 0 < N < M (N kept of every M), "
                         f"got N={keep}, M={group}")
    return keep, group


@dataclass(frozen=True)
class PruneConfig:
    """One-shot pruning of a pipeline's denoiser.

    ``method``: "obs" (SparseGPT's solver on timestep-weighted Hessians), "wanda" or "magnitude".
    ``pattern``: "unstructured", "structured" (whole heads / FFN neurons removed; obs and magnitude) or
    "N:M" such as "2:4" / "4:8" (with ``sparse_kernels``, 2:4 layers run torch's semi-structured sparse
    kernels where the device has them). ``keep_last_block_dense``: leave the block nearest the output
    dense (default, as OBS-Diff). ``sparsity``: fraction of weights (unstructured), of FFN neurons and attention heads per module
    (structured); None (the default) means 0.5, or for N:M the implied 1 - N/M. ``scope`` (unstructured only): "layer" prunes
    every layer to ``sparsity``; "global" makes ``sparsity`` the fraction over all pruned layers and
    splits it into per-layer sparsities (``prune.allocate``) by ``allocation``: "error" (the least
    summed relative output error, measured on real Hessians; default for OBS and Wanda) or
    "saliency" (one threshold on layer-normalised saliency; default for magnitude, data-free).
    ``weighting`` / ``weight_range``: per-step Hessian weights (OBS-Diff default log-decrease 0.8..1.2).
    ``groups``: K for group-wise sequential pruning (an int >= 1, or "all" for one calibration sweep
    per unit); a group whose full Hessians would exceed a quarter of the device's memory is split
    further (one more sweep per piece; ``PruneReport.groups`` counts the groups run). ``damp``: fraction of mean(diag H) added
    to the Hessian diagonal. ``blocksize``: solver columns per lazy-update block. ``exclude``: layer or
    module-name prefixes left dense (the adapter's high-precision layers are always left dense).
    ``calib_prompts`` / ``calib_num_steps`` / ``calib_guidance_scale``: calibration used when ``prune_`` gets
    no Calibration; ``calib_kwargs``: (name, value) pairs passed on to that calibration's pipeline calls
    (e.g. ``(("height", 32), ("width", 32))``, or Flux's ``negative_prompt`` / ``true_cfg_scale``).
    ``prune_heads`` / ``prune_ffn`` / ``prune_resnets``: which units structured pruning removes
    (``prune_resnets``, off by default: ResNet inner channels by whole GroupNorm groups, the bulk of a
    UNet's compute).
    """

    method: str = "obs"
    sparsity: float | None = None  # DEFAULT_SPARSITY, or 1 - N/M for N:M patterns
    pattern: str = "unstructured"
    scope: str = "layer"
    allocation: str | None = None
    weighting: str = "log-decrease"
    weight_range: tuple[float, float] = (0.8, 1.2)
    groups: int | str = 4
    damp: float = 0.01
    blocksize: int = 128
    keep_last_block_dense: bool = True
    exclude: tuple[str, ...] = field(default_factory=tuple)
    prune_heads: bool = True
    prune_ffn: bool = True
    prune_resnets: bool = False
    calib_prompts: int = 4
    calib_num_steps: int = 25
    calib_guidance_scale: float | None = None
    calib_kwargs: tuple[tuple[str, Any], ...] = ()
    sparse_kernels: bool = True

    def __post_init__(self) -> None:
        plain_scalars(self)
        object.__setattr__(self, "exclude", _prefixes(self.exclude))
        object.__setattr__(self, "weight_range", _number_pair("weight_range", self.weight_range))
        object.__setattr__(self, "calib_kwargs", _json_pairs("calib_kwargs", self.calib_kwargs))
        nm = parse_nm(self.pattern) if isinstance(self.pattern, str) else None
        if nm is not None:  # " 2:4 " / "02:04" pruned 2:4 but never matched the 2:4 sparse kernels
            object.__setattr__(self, "pattern", f"{nm[0]}:{nm[1]}")
        if self.sparsity is None and parse_nm(str(self.pattern)) is None:
            object.__setattr__(self, "sparsity", DEFAULT_SPARSITY)
        _check_flags(self)
        _check_choice("method", self.method, METHODS)
        _check_pattern(self)
        _check_sparsity(self)
        _check_numbers(self)
        if self.weighting not in WEIGHTING_SCHEMES:
            raise ValueError(f"unknown weighting {self.weighting!r}; accepted: {', '.join(WEIGHTING_SCHEMES)}")
        if self.groups != "all" and (isinstance(self.groups, bool) or not isinstance(self.groups, int)
                                     or self.groups < 1):
            raise ValueError(f"groups must be an int >= 1 or 'all', got {self.groups!r}")

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for N:M patterns, None otherwise."""
        return parse_nm(self.pattern)

    @property
    def structured(self) -> bool:
        """True for pattern "structured" (heads / FFN neurons removed, layers made smaller)."""
        return self.pattern == "structured"

    @property
    def target_sparsity(self) -> float:
        """Fraction of weights (or units) to remove: ``sparsity``, or 1 - N/M for N:M."""
        nm = self.nm
        return 1.0 - nm[0] / nm[1] if nm else float(self.sparsity)

    @property
    def global_allocation(self) -> str:
        """The allocation scope="global" uses: ``allocation``, or "saliency" for magnitude, else "error"."""
        return self.allocation or ("saliency" if self.method == "magnitude" else "error")

    @property
    def needs_calibration(self) -> bool:
        """True when layer inputs are read (OBS Hessians, Wanda norms, global error allocation)."""
        return self.method != "magnitude" or (self.scope == "global" and self.global_allocation == "error")

    def with_(self, **changes: Any) -> "PruneConfig":
        """A validated copy with ``changes`` applied (unknown fields named), as ``PTQConfig.with_``."""
        unknown = sorted(set(changes) - set(self.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown PruneConfig fields {unknown}; accepted: {sorted(self.__dataclass_fields__)}")
        if "pattern" in changes and "sparsity" not in changes and parse_nm(str(changes["pattern"])) is not None:
            changes["sparsity"] = None  # an N:M pattern sets it (the sparsity kept, 0.5 by default, conflicted)
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PruneConfig":
        """Inverse of ``to_dict``; unknown keys raise a ValueError naming them."""
        if not isinstance(values, dict):
            raise TypeError(f"PruneConfig.from_dict takes a dict (PruneConfig.to_dict()), got {type(values).__name__}")
        values = dict(values)
        if "calib_steps" in values and "calib_num_steps" not in values:  # its name until session 28 (artifacts)
            values["calib_num_steps"] = values.pop("calib_steps")
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown PruneConfig fields {unknown}; accepted: {sorted(cls.__dataclass_fields__)}")
        return cls(**values)


def _prefixes(value: Any) -> tuple[str, ...]:
    """``exclude`` as a tuple of non-empty strings (a bare string was split into one-letter prefixes)."""
    if isinstance(value, str):
        raise ValueError(f"exclude takes a tuple of module-name prefixes, got the string {value!r}; "
                         f"write ({value!r},)")
    try:
        prefixes = tuple(value)
    except TypeError:
        raise ValueError(f"exclude takes a tuple of module-name prefixes, got {value!r}") from None
    if not all(isinstance(prefix, str) and prefix for prefix in prefixes):
        raise ValueError(f"exclude holds module-name prefixes (non-empty strings), got {value!r}")
    return prefixes


def _number_pair(name: str, value: Any) -> tuple[float, float]:
    """``value`` as a pair of finite numbers, else a ValueError naming ``name``."""
    try:
        pair = tuple(value)
    except TypeError:
        pair = ()
    ok = len(pair) == 2 and all(is_finite_number(item) for item in pair)
    if not ok:
        raise ValueError(f"{name} must be (w_min, w_max), two finite numbers, got {value!r}")
    return pair


def _json_pairs(name: str, value: Any) -> tuple[tuple[str, Any], ...]:
    """``_pairs`` whose values the artifact's JSON manifest can hold (a numpy int passed pruning, then
    ``save`` failed half-written)."""
    pairs = []
    for key, item in _pairs(name, value):
        try:
            pairs.append((key, json_form(item)))  # as a save / load gives it back
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{key!r}]={item!r} cannot be stored in the artifact manifest (JSON); pass "
                             f"plain values (int, float, str, bool, None, lists / dicts of them)") from None
    return tuple(pairs)


def _check_flags(config: "PruneConfig") -> None:
    for name in FLAGS:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(config, name)!r}")


def _pairs(name: str, value: Any) -> tuple[tuple[str, Any], ...]:
    """``value`` (a dict or (key, value) pairs) as a tuple of pairs with string keys."""
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = tuple((key, val) for key, val in items)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a dict or (name, value) pairs, got {value!r}") from None
    if not all(isinstance(key, str) for key, _ in pairs):
        raise TypeError(f"{name} keys must be strings, got {[key for key, _ in pairs]!r}")
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:  # a dict of them kept the last value silently
        raise ValueError(f"{name} sets {repeated} more than once; give each argument once")
    return pairs


def _check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")


def _check_pattern(config: PruneConfig) -> None:
    if not isinstance(config.pattern, str):
        raise TypeError(f"pattern must be a string, got {type(config.pattern).__name__}; accepted: {', '.join(PATTERNS)}")
    if config.pattern not in ("unstructured", "structured") and parse_nm(config.pattern) is None:
        raise ValueError(f"unknown pattern {config.pattern!r}; accepted: {', '.join(PATTERNS)}")
    if config.structured and config.method not in STRUCTURED_METHODS:
        raise ValueError(f"structured pruning supports methods {STRUCTURED_METHODS}, got {config.method!r}")
    _check_choice("scope", config.scope, SCOPES)
    if config.scope == "global" and config.pattern != "unstructured":
        raise ValueError(f"scope='global' needs pattern='unstructured' (N:M and structured patterns fix "
                         f"the sparsity of every layer), got pattern {config.pattern!r}")
    if config.allocation is not None:
        _check_choice("allocation", config.allocation, ALLOCATIONS)
        if config.scope != "global":
            raise ValueError(f"allocation={config.allocation!r} splits a global target; it needs scope='global', "
                             f"got scope {config.scope!r}")
    if config.structured and not (config.prune_heads or config.prune_ffn or config.prune_resnets):
        raise ValueError("structured pruning needs prune_heads, prune_ffn or prune_resnets set to True")


def _check_sparsity(config: PruneConfig) -> None:
    value, nm = config.sparsity, parse_nm(config.pattern)
    if nm is not None:
        implied = 1.0 - nm[0] / nm[1]
        if value is not None and not (isinstance(value, (int, float)) and math.isclose(value, implied)):
            raise ValueError(f"pattern {config.pattern!r} implies sparsity {implied:g}; got sparsity={value!r} "
                             f"(pass None or {implied:g})")
        return
    if not is_finite_number(value):
        raise TypeError(f"sparsity must be a float in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {value!r}")


def _check_numbers(config: PruneConfig) -> None:
    if not (is_finite_number(config.damp) and config.damp > 0):
        raise ValueError(f"damp must be a finite float > 0, got {config.damp!r}")
    if isinstance(config.blocksize, bool) or not isinstance(config.blocksize, int) or config.blocksize < 1:
        raise ValueError(f"blocksize must be an int >= 1, got {config.blocksize!r}")
    nm = parse_nm(config.pattern)
    if nm is not None and config.method == "obs" and config.blocksize % nm[1]:  # OBS's column blocks hold whole groups
        raise ValueError(f"blocksize {config.blocksize} must be a multiple of M={nm[1]} for pattern {config.pattern!r} "
                         f"with method 'obs'")
    if isinstance(config.calib_prompts, bool) or not isinstance(config.calib_prompts, int) or config.calib_prompts < 1:
        raise ValueError(f"calib_prompts must be an int >= 1, got {config.calib_prompts!r}")
    if isinstance(config.calib_num_steps, bool) or not isinstance(config.calib_num_steps, int) or config.calib_num_steps < 1:
        raise ValueError(f"calib_num_steps must be an int >= 1 (PruneConfig's calibration runs that many denoising "
                         f"steps and observes all of them, as PTQConfig's calib_num_steps), "
                         f"got {config.calib_num_steps!r}")
    guidance = config.calib_guidance_scale
    if guidance is not None and not (is_finite_number(guidance) and guidance >= 0):
        raise ValueError(f"calib_guidance_scale must be a finite number >= 0 or None, got {guidance!r}")
    if not 0 <= config.weight_range[0] <= config.weight_range[1]:
        raise ValueError(f"weight_range must be (w_min, w_max) with 0 <= w_min <= w_max, got {config.weight_range!r}")
