"""Small real structures and featomic calculators used by the tests."""

import pytest
import torch

import featomic.torch as ft
from metatomic.torch import System

from rascaline_e3nn.check import DEFAULT_CELL, DEFAULT_POSITIONS, DEFAULT_TYPES

#: parametrize over these; CUDA is skipped visibly where there is none
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))]


def water_sodium(positions_shift=0.0, dtype=torch.float64):
    """A small periodic box: two waters and one Na, non-orthorhombic cell (the
    structure embedded in ``rascaline_e3nn.check``)."""
    positions = torch.tensor(DEFAULT_POSITIONS, dtype=dtype) + positions_shift
    cell = torch.tensor(DEFAULT_CELL, dtype=dtype)
    types = torch.tensor(DEFAULT_TYPES)
    return System(types=types, positions=positions, cell=cell, pbc=torch.tensor([True] * 3))


def molecules(dtype=torch.float64):
    """A batch of separate molecules with different types: water, methane, NaCl-like
    pair, CO — no structure has every type, so featomic omits keys and samples."""
    def molecule(types, positions):
        return System(
            types=torch.tensor(types),
            positions=torch.tensor(positions, dtype=dtype),
            cell=torch.zeros((3, 3), dtype=dtype),
            pbc=torch.tensor([False] * 3),
        )
    return [
        molecule([8, 1, 1], [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]),
        molecule([6, 1, 1, 1, 1], [[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                                   [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]]),
        molecule([11, 17], [[0, 0, 0], [0.4, 1.2, 2.1]]),
        molecule([6, 8], [[0, 0, 0], [0.2, 0.3, 1.1]]),
    ]


def rotate(system, R):
    """Apply R (proper or improper) to positions and cell; keep a right-handed cell
    (the lattice is unchanged when a cell vector changes sign)."""
    cell = system.cell @ R.T
    if system.pbc.any() and torch.det(cell) < 0:
        cell = cell * torch.tensor([[-1.0], [1.0], [1.0]], dtype=cell.dtype)
    return System(types=system.types, positions=system.positions @ R.T, cell=cell,
                  pbc=system.pbc)


def accurate_rotations(n):
    """n random rotations (e3nn's ``o3.rand_matrix``) for which e3nn's own
    ``D_from_matrix`` is accurate to 1e-14.

    e3nn recovers Euler angles from the matrix, and for some rotations loses
    precision: e.g. its ``1o`` representation of a rotation, which must equal the
    rotation itself, can differ from it by 3e-12 (and 7e-11 for l=2). Equivariance
    checked at 1e-12 needs a reference that is itself exact to much better than that.
    """
    from e3nn import o3

    rotations = []
    while len(rotations) < n:
        R = o3.rand_matrix(dtype=torch.float64)
        D = o3.Irrep(1, -1).D_from_matrix(R)
        if (D - R).abs().max() < 1e-14:
            rotations.append(R)
    return rotations


def lode(max_angular=4, max_radial=2):
    return ft.LodeSphericalExpansion(
        density={"type": "SmearedPowerLaw", "smearing": 1.0, "exponent": 1},
        basis={"type": "TensorProduct", "max_angular": max_angular,
               "radial": {"type": "Gto", "max_radial": max_radial, "radius": 3.0}},
    )


def spherical_expansion(max_angular=4, max_radial=3, cutoff=3.5):
    return ft.SphericalExpansion(
        cutoff={"radius": cutoff, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
        density={"type": "Gaussian", "width": 0.3},
        basis={"type": "TensorProduct", "max_angular": max_angular,
               "radial": {"type": "Gto", "max_radial": max_radial}},
    )
