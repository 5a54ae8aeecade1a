"""Posterior structures: one shape of curvature and posterior precision each
(dense, diagonal, Kronecker-factored, low-rank plus diagonal)."""

from laplace.structures.dense import DensePrecision, DenseStructure
from laplace.structures.diagonal import DiagonalPrecision, DiagonalStructure
from laplace.structures.kronecker import KroneckerPrecision, KroneckerStructure
from laplace.structures.lowrank import LowRankPrecision, LowRankStructure
from laplace.structures.protocol import Layout, PosteriorStructure, Precision

__all__ = [
    "Layout",
    "PosteriorStructure",
    "Precision",
    "DenseStructure",
    "DensePrecision",
    "DiagonalStructure",
    "DiagonalPrecision",
    "KroneckerStructure",
    "KroneckerPrecision",
    "LowRankStructure",
    "LowRankPrecision",
]
