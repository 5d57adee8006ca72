"""Which parameters R-SFT may change: regexes over parameter names, optionally limited to a layer range."""

from __future__ import annotations

import re
from typing import Optional

from ..core.errors import MergeEditError
from ..io.architecture import parse_layer_name


def select_trainable(names: list[str], patterns: list[str], layers: Optional[tuple[int, int]], where: str) -> list[str]:
    """The parameter names matching any pattern (re.search) inside [layers[0], layers[1]) when a range is given."""
    compiled = [re.compile(p) for p in patterns]
    chosen = []
    for name in names:
        if not any(c.search(name) for c in compiled):
            continue
        if layers is not None:
            parsed = parse_layer_name(name)
            if parsed is None or not layers[0] <= parsed.index < layers[1]:
                continue
        chosen.append(name)
    if not chosen:
        example = next((n for n in names if parse_layer_name(n)), names[0] if names else "?")
        span = f" in layers [{layers[0]}, {layers[1]})" if layers else ""
        raise MergeEditError(f"{where}: trainable patterns {patterns}{span} match no parameter of the model; names look like '{example}'")
    return chosen
