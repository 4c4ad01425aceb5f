"""The one home of the conventions shared by featomic/metatensor and e3nn.

Everything that relates a metatensor key ``(o3_lambda, o3_sigma)`` to an e3nn irrep,
and featomic's real spherical harmonics to e3nn's, lives here.
"""

import functools
from typing import List, Tuple

import torch
from e3nn import o3

#: Rotation relating the two bases: ``x_e3nn = D(Q) @ x_featomic`` for every irrep.
#: featomic's l = 1 components are (y, z, x), e3nn's are (x, y, z); det(Q) = +1.
BASIS_CHANGE_MATRIX = ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))

#: Allowed values of the ``basis`` option.
BASES = ("e3nn", "featomic")
#: Allowed values of the ``layout`` option.
LAYOUTS = ("mul_ir", "ir_mul")
#: Allowed values of the ``unlisted_rows`` option: what ``forward(tensor, rows)``
#: does with the rows of the tensor that ``rows`` does not list.
UNLISTED_ROWS = ("error", "drop")


def parity(o3_lambda: int, o3_sigma: int) -> int:
    """e3nn parity of the metatensor block ``(o3_lambda, o3_sigma)``.

    >>> parity(1, 1), parity(2, 1), parity(1, -1)
    (-1, 1, 1)
    """
    if o3_sigma not in (-1, 1):
        raise ValueError(f"o3_sigma must be +1 or -1, got {o3_sigma}")
    if o3_lambda < 0:
        raise ValueError(f"o3_lambda must be non-negative, got {o3_lambda}")
    return o3_sigma * (-1) ** o3_lambda


def sigma(l: int, p: int) -> int:
    """metatensor ``o3_sigma`` of the e3nn irrep ``(l, p)``.

    >>> sigma(1, -1), sigma(1, 1), sigma(0, -1)
    (1, -1, -1)
    """
    if p not in (-1, 1):
        raise ValueError(f"parity must be +1 or -1, got {p}")
    return p * (-1) ** l


def change_of_basis(l: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(2l+1, 2l+1)`` matrix ``D`` such that ``x_e3nn = D @ x_featomic``.

    For l = 0 and 1 this is a permutation matrix; for l >= 2 it is dense.

    >>> change_of_basis(1)
    tensor([[0., 0., 1.],
            [1., 0., 0.],
            [0., 1., 0.]], dtype=torch.float64)
    """
    return _change_of_basis(l).to(dtype)


@functools.lru_cache(maxsize=None)
def _change_of_basis(l: int) -> torch.Tensor:
    # Fitted in float64 from e3nn's own harmonics, Y(Q x) = D Y(x): the same matrix as
    # Irrep(l, 1).D_from_matrix(Q), without switching the global default dtype (which
    # D_from_matrix needs for float64 accuracy, and which is not thread-safe).
    Q = torch.tensor(BASIS_CHANGE_MATRIX, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8 * (2 * l + 1), 3, generator=generator, dtype=torch.float64)
    Y = o3.spherical_harmonics(l, x, normalize=True)
    YQ = o3.spherical_harmonics(l, x @ Q.T, normalize=True)
    D = torch.linalg.lstsq(Y, YQ).solution.T.contiguous()
    # D(Q) is sparse: remove the ~1e-16 residues of the fit
    D = torch.where(D.abs() < 1e-12, torch.zeros_like(D), D)
    if l <= 1:
        D = D.round() + 0.0
    return D


def basis_permutation(l: int) -> List[int]:
    """For l <= 1, ``perm`` such that ``x_e3nn[i] = x_featomic[perm[i]]`` exactly.

    >>> basis_permutation(1)
    [2, 0, 1]
    """
    if l > 1:
        raise ValueError(f"the change of basis is not a permutation for l = {l} >= 2")
    D = change_of_basis(l)
    perm = [int(i) for i in D.argmax(dim=1)]
    if not torch.equal(D, torch.eye(2 * l + 1, dtype=D.dtype)[perm]):
        raise AssertionError(f"e3nn's change of basis for l={l} is not a permutation")
    return perm


def check_option(name: str, value: str, allowed: Tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value
