"""`mergeedit run`: a recipe's stages (edits -> R-SFT -> merge -> evaluation), cached and resumable."""
