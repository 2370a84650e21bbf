"""Caption templates × Fashion-MNIST class names, shared by CLIP training, the pipelines and the benchmark."""

from __future__ import annotations

import re

from .data import CLASS_NAMES

TEMPLATES = (
    "a photo of {a} {c}",
    "{a} {c}",
    "{a} {c} on a plain background",
    "a black and white photo of {a} {c}",
    "a grayscale image of {a} {c}",
    "a product photo of {a} {c}",
    "a small picture of {a} {c}",
    "a centered photo of {a} {c}",
    "a low resolution photo of {a} {c}",
    "a catalog image of {a} {c}",
)
DISPLAY_NAMES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat",
                 "sandal", "shirt", "sneaker", "bag", "ankle boot")


def caption(label: int, template: int = 0) -> str:
    """Caption for class index ``label`` (0–9) from template number ``template``."""
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"label must be in 0..{len(CLASS_NAMES) - 1}, got {label}")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template must be in 0..{len(TEMPLATES) - 1}, got {template}")
    name = DISPLAY_NAMES[label]
    article = "an" if name[0] in "aeiou" else "a"
    return TEMPLATES[template].format(a=article, c=name)


def all_captions() -> list[str]:
    """Every caption, ordered label-major: index = label * len(TEMPLATES) + template."""
    return [caption(lab, t) for lab in range(len(CLASS_NAMES)) for t in range(len(TEMPLATES))]


def vocabulary() -> tuple[str, ...]:
    """Sorted words (letters only) and punctuation pieces that appear in any caption."""
    words = {w for text in all_captions() for w in re.findall(r"[a-z]+|[^a-z\s]", text)}
    return tuple(sorted(words))
