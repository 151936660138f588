"""Thin SparseML adapters, one file per recipe tag: lifecycle only; the math is in ``algorithms/``."""
