"""The paper's R-SFT loop, spelled out for tests written against it.

Since stop 25 the `rsft` method's defaults are the best settings measured on SmolLM2-135M (breadth-first, EOS, retain
KL, replay: mergeedit.pipeline.recipe.METHOD_DEFAULTS). Tests of the loop's mechanics (depth-first steps, stage
layout, exact deltas) keep the paper's loop by naming these keys; the defaults themselves are tested on their own.
"""

from mergeedit.pipeline.recipe import PAPER_LOOP

__all__ = ["PAPER_LOOP"]
