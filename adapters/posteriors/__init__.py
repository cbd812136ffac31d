"""Posterior families over the LoRA-XS cores, behind one interface (:class:`Posterior`).

================= ====================================== =================================================
family            class                                  stored tensors
================= ====================================== =================================================
``map``           :class:`MapPosterior`                  mean
``diag``          :class:`DiagPosterior` (Laplace, VI)   mean, variance
``kron``          :class:`KronPosterior`                 mean, eigenbases and eigenvalues of both factors
``full``          :class:`FullPosterior`                 mean, Cholesky factor of the covariance
``lowrank_diag``  :class:`LowRankDiagPosterior` (SWAG)   mean, diagonal variance, K deviations
``ensemble``      :class:`EnsemblePosterior`             M member values
``dropout``       :class:`DropoutPosterior` (MC dropout) mean, rate
``matrix_normal`` :class:`MatrixNormalPosterior`         mean, row and column Cholesky factors, λ per block
================= ====================================== =================================================
"""

from adapters.posteriors.base import Posterior, TensorDict, flatten, make_generator
from adapters.posteriors.dropout import DropoutPosterior, drop_columns
from adapters.posteriors.gaussian import DiagPosterior, FullPosterior, LowRankDiagPosterior
from adapters.posteriors.kron import KronFactors, KronPosterior
from adapters.posteriors.matrix_normal import MatrixNormalFactors, MatrixNormalPosterior
from adapters.posteriors.point import EnsemblePosterior, MapPosterior

__all__ = [
    "DiagPosterior",
    "DropoutPosterior",
    "EnsemblePosterior",
    "FullPosterior",
    "KronFactors",
    "KronPosterior",
    "LowRankDiagPosterior",
    "MapPosterior",
    "MatrixNormalFactors",
    "MatrixNormalPosterior",
    "Posterior",
    "TensorDict",
    "drop_columns",
    "flatten",
    "make_generator",
]
