"""A slow, loop-by-loop numpy reference of featomic's LODE spherical expansion.

One periodic system at a time, written to be read against featomic's
``calculators/lode/spherical_expansion.rs``: k-vectors of a half-space below the
cutoff (``math/k_vectors.rs``), structure factors, real spherical harmonics in
featomic's convention, ``phase(l)``, ``4 pi / V``, the k = 0 term and the centre-atom
term, with featomic's order of floating-point operations where it is cheap to follow
(k-vectors, structure factors, the order of the sum over k), so that the comparison
measures the radial part. Radial integrals and the density's Fourier transform come from
:class:`rascaline_e3nn._lode_radial.LodeRadialIntegral`.
"""

import math
from typing import Dict, List, Tuple

import numpy as np
import torch
from e3nn import o3

from rascaline_e3nn._conventions import change_of_basis
from rascaline_e3nn._lode_radial import LodeRadialIntegral


def _inverse(m):
    """featomic's ``Matrix3::inverse`` (cofactors times the inverse determinant)."""
    determinant = (
        m[0][0] * (m[1][1] * m[2][2] - m[2][1] * m[1][2])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )
    d = 1.0 / determinant
    return [
        [
            (m[1][1] * m[2][2] - m[2][1] * m[1][2]) * d,
            (m[0][2] * m[2][1] - m[0][1] * m[2][2]) * d,
            (m[0][1] * m[1][2] - m[0][2] * m[1][1]) * d,
        ],
        [
            (m[1][2] * m[2][0] - m[1][0] * m[2][2]) * d,
            (m[0][0] * m[2][2] - m[0][2] * m[2][0]) * d,
            (m[1][0] * m[0][2] - m[0][0] * m[1][2]) * d,
        ],
        [
            (m[1][0] * m[2][1] - m[2][0] * m[1][1]) * d,
            (m[2][0] * m[0][1] - m[0][0] * m[2][1]) * d,
            (m[0][0] * m[1][1] - m[1][0] * m[0][1]) * d,
        ],
    ]


def k_vectors(cell: np.ndarray, k_cutoff: float) -> Tuple[np.ndarray, np.ndarray]:
    """The k-vectors featomic sums over, in featomic's order and arithmetic.

    ``cell`` holds the lattice vectors as rows. featomic keeps ``n1 > 0``, or
    ``n1 = 0, n2 > 0``, or ``n1 = n2 = 0, n3 > 0``, with ``|k| < k_cutoff``; the
    reciprocal vectors are the rows of ``2 pi (cell^T)^-1``.

    Returns
    -------
    norms : numpy.ndarray
        ``[K]``.
    directions : numpy.ndarray
        ``[K, 3]`` unit vectors ``k / |k|``.
    """
    transposed = [[float(cell[j][i]) for j in range(3)] for i in range(3)]
    two_pi = 2.0 * math.pi
    reciprocal = [[two_pi * v for v in row] for row in _inverse(transposed)]
    b1, b2, b3 = (np.array(row) for row in reciprocal)

    r = np.array(reciprocal)
    m = r @ r.T
    k_volume = np.linalg.det(r)
    n1_max = int(math.sqrt(m[1, 1] * m[2, 2] - m[1, 2] * m[1, 2]) / k_volume * k_cutoff)
    n2_max = int(math.sqrt(m[2, 2] * m[0, 0] - m[2, 0] * m[2, 0]) / k_volume * k_cutoff)
    n3_max = int(math.sqrt(m[0, 0] * m[1, 1] - m[0, 1] * m[0, 1]) / k_volume * k_cutoff)

    norms: List[float] = []
    directions: List[np.ndarray] = []

    def add(k):
        norm_squared = k[0] * k[0] + k[1] * k[1] + k[2] * k[2]
        if norm_squared < k_cutoff * k_cutoff:
            norm = math.sqrt(norm_squared)
            norms.append(norm)
            directions.append(k / norm)

    for n3 in range(1, n3_max + 1):
        add(float(n3) * b3)
    for n2 in range(1, n2_max + 1):
        for n3 in range(-n3_max, n3_max + 1):
            add(float(n2) * b2 + float(n3) * b3)
    for n1 in range(1, n1_max + 1):
        for n2 in range(-n2_max, n2_max + 1):
            for n3 in range(-n3_max, n3_max + 1):
                add(float(n1) * b1 + float(n2) * b2 + float(n3) * b3)
    return np.array(norms), np.array(directions).reshape(-1, 3)


def structure_factors(
    positions: np.ndarray, types: np.ndarray, norms: np.ndarray, directions: np.ndarray
) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """``2 sum_j cos(k.(r_i - r_j))`` and ``2 sum_j sin(k.(r_i - r_j))`` per neighbour type.

    As featomic writes them (``compute_structure_factors``): ``cos(k.r_i) C_b(k) +
    sin(k.r_i) S_b(k)`` and ``sin(k.r_i) C_b(k) - cos(k.r_i) S_b(k)``, with ``C_b``,
    ``S_b`` the sums of ``cos(k.r_j)``, ``sin(k.r_j)`` over the atoms ``j`` of type ``b``
    and ``k.r`` computed as ``(|k| k_hat) . r``.

    Returns
    -------
    dict
        ``{type: (real [N, K], imaginary [N, K])}``.
    """
    k = norms[:, None] * directions
    kr = (k[None, :, 0] * positions[:, None, 0] + k[None, :, 1] * positions[:, None, 1]) + (
        k[None, :, 2] * positions[:, None, 2]
    )
    cosines = np.cos(kr)
    sines = np.sin(kr)
    result = {}
    for neighbor_type in sorted(set(int(t) for t in types)):
        sum_cos = np.zeros(norms.shape[0])
        sum_sin = np.zeros(norms.shape[0])
        for j in range(positions.shape[0]):
            if types[j] == neighbor_type:
                sum_cos = sum_cos + cosines[j]
                sum_sin = sum_sin + sines[j]
        real = 2.0 * (cosines * sum_cos + sines * sum_sin)
        imaginary = 2.0 * (sines * sum_cos - cosines * sum_sin)
        result[neighbor_type] = (real, imaginary)
    return result


def real_spherical_harmonics(l: int, directions: np.ndarray) -> np.ndarray:
    """featomic's real spherical harmonics ``[K, 2l + 1]`` of unit vectors ``[K, 3]``.

    e3nn's orthonormal harmonics, taken back to featomic's basis with the change of
    basis of :mod:`rascaline_e3nn._conventions` (``x_e3nn = D @ x_featomic``).
    """
    directions = torch.tensor(directions, dtype=torch.float64)
    y = o3.spherical_harmonics(l, directions, normalize=True, normalization="integral")
    D = change_of_basis(l, dtype=torch.float64)
    return (y @ D).numpy()


def phase(l: int) -> float:
    """Real part of ``i^l`` paired with featomic's choice of cosine or sine."""
    if l % 2 == 0:
        return (-1.0) ** (l // 2)
    return (-1.0) ** ((l + 1) // 2)


def lode_expansion(
    positions: np.ndarray,
    cell: np.ndarray,
    types: np.ndarray,
    radial: LodeRadialIntegral,
) -> Dict[Tuple[int, int, int], np.ndarray]:
    """featomic's LODE spherical expansion of one periodic system.

    Parameters
    ----------
    positions : numpy.ndarray
        ``[N, 3]``.
    cell : numpy.ndarray
        ``[3, 3]``, lattice vectors as rows.
    types : numpy.ndarray
        ``[N]`` atomic types.
    radial : LodeRadialIntegral
        Radial integrals, density and the k = 0 and centre-atom terms.

    Returns
    -------
    dict
        ``{(l, center_type, neighbor_type): [n_centers, 2l + 1, n_radial]}``, centres
        in the order of the atoms.
    """
    norms, directions = k_vectors(cell, radial.k_cutoff)
    volume = abs(np.linalg.det(cell))
    global_factor = 4.0 * math.pi / volume

    k_torch = torch.tensor(norms, dtype=torch.float64)
    with torch.no_grad():
        integrals = [i.numpy() for i in radial(k_torch)]
        density = radial.density_fourier(k_torch).numpy()
    k0_term = radial.k0_term.numpy()
    center_term = radial.center_term.numpy()
    exponent = radial.exponent
    factors = structure_factors(positions, types, norms, directions)

    n_atoms = positions.shape[0]
    unique_types = sorted(set(int(t) for t in types))
    n_radial = radial.max_radial + 1

    result = {}
    for l in range(radial.max_angular + 1):
        harmonics = real_spherical_harmonics(l, directions)
        # [K, 2l + 1, n]: I_nl(k) Y_lm(k)
        projection = harmonics[:, :, None] * integrals[l][:, None, :]
        for center_type in unique_types:
            centers = [i for i in range(n_atoms) if types[i] == center_type]
            for neighbor_type in unique_types:
                real, imaginary = factors[neighbor_type]
                structure_factor = real if l % 2 == 0 else imaginary
                block = np.zeros((len(centers), 2 * l + 1, n_radial))
                for row, i in enumerate(centers):
                    # the centre atom's own density, minus its weight
                    if l == 0 and neighbor_type == center_type:
                        block[row, 0, :] -= center_term
                    # k = 0: once per neighbour of this type
                    if l == 0 and (exponent == 0 or exponent > 3):
                        for j in range(n_atoms):
                            if types[j] == neighbor_type:
                                block[row, 0, :] += global_factor * k0_term
                    k_dependent = global_factor * phase(l) * density * structure_factor[i]
                    # sum over k in order (a cumulative sum is sequential)
                    terms = k_dependent[:, None, None] * projection
                    block[row] += np.cumsum(terms, axis=0)[-1] if len(norms) else 0.0
                result[(l, center_type, neighbor_type)] = block
    return result
