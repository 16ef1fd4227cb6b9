"""Demo builders: the digits experts and the tiny-LM model family the demos and tests use."""
