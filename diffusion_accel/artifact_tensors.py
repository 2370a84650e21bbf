"""The tensors of one artifact technique file, checked as techniques read them.

A technique's ``restore`` reads its tensors through :class:`TechniqueTensors` with :meth:`~TechniqueTensors.take`,
which names the tensor and what was expected when one is missing or has another shape or dtype; ``load``
then refuses tensors no restore read. Before session 28 a hand-edited or damaged file loaded silently
when its shapes broadcast or its dtype cast (a (16, 1) weight scale saved as (1, 16); int codes
stored as float), and the images changed without an error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

class TechniqueTensors(Mapping):
    """Read-only mapping of one technique file's tensors that records which ones were read."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], filename: str) -> None:
        self._tensors, self.filename, self.read = dict(tensors), filename, set()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._tensors:
            raise KeyError(f"{self.filename} has no tensor {key!r}")
        self.read.add(key)
        return self._tensors[key]

    def __contains__(self, key: object) -> bool:  # Mapping's default reads the tensor, marking it used
        return key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def take(self, key: str, shape: Sequence[int] | None = None, dtype: torch.dtype | str | None = None,
             values: tuple[int, int] | None = None, scales: str | None = None, finite: bool = False) -> torch.Tensor:
        """Tensor ``key``, checked: ``shape`` exactly, ``dtype`` a torch dtype or a kind ("float" or
        "int"), integer ``values`` within the inclusive range, ``scales`` "positive" or "nonnegative"
        finite floats, ``finite`` no NaN or infinity; ValueError naming the tensor otherwise."""
        tensor = self[key]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor {key!r} of {self.filename} has shape {list(tensor.shape)}, expected "
                             f"{list(shape)}")
        if dtype is not None and not _dtype_fits(tensor.dtype, dtype):
            raise ValueError(f"tensor {key!r} of {self.filename} is {str(tensor.dtype).replace('torch.', '')}, "
                             f"expected {str(dtype).replace('torch.', '')}")
        if values is not None and tensor.numel() and not (values[0] <= int(tensor.min()) and
                                                          int(tensor.max()) <= values[1]):
            raise ValueError(f"tensor {key!r} of {self.filename} holds values in [{int(tensor.min())}, "
                             f"{int(tensor.max())}], outside the format's [{values[0]}, {values[1]}]")
        if scales is not None:
            self._check_scales(key, tensor, scales)
        finite_values = torch.isfinite(tensor.float()) if finite and tensor.is_floating_point() else None  # fp8 too
        if finite_values is not None and not bool(finite_values.all()):
            raise ValueError(f"tensor {key!r} of {self.filename} holds {int((~finite_values).sum())} NaN "
                             f"or infinite values (saved weights are finite numbers)")
        return tensor

    def _check_scales(self, key: str, tensor: torch.Tensor, kind: str) -> None:
        """Quantization scales must be finite and > 0 ("positive") or >= 0 ("nonnegative"; a weight row of
        zeros may have a zero scale in float16): NaN, inf or a negative scale gives garbage images."""
        wrong = ~torch.isfinite(tensor) | (tensor <= 0 if kind == "positive" else tensor < 0)
        if bool(wrong.any()):
            example = tensor[wrong].flatten()[0].item()
            raise ValueError(f"tensor {key!r} of {self.filename} holds {int(wrong.sum())} scales that are not "
                             f"{kind} finite numbers (e.g. {example})")

    def unread(self) -> list[str]:
        """Names of the tensors no restore read (sorted)."""
        return sorted(self._tensors.keys() - self.read)


def technique_tensors(tensors: Mapping[str, torch.Tensor]) -> TechniqueTensors:
    """``tensors`` as a TechniqueTensors (restore functions called directly with a plain dict)."""
    return tensors if isinstance(tensors, TechniqueTensors) else TechniqueTensors(tensors, "the tensors")


def _dtype_fits(found: torch.dtype, expected: torch.dtype | str) -> bool:
    if expected == "float":
        return found.is_floating_point and found.itemsize >= 2
    if expected == "int":
        return not found.is_floating_point and not found.is_complex and found != torch.bool
    return found == expected
