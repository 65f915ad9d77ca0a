"""Eager references: the math every kernel in ``kernels`` must equal."""
