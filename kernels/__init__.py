"""Fused kernels for AudioMAE and MAE-AST: each op beside its eager reference."""
