"""A slow, loop-by-loop numpy reference of featomic's LODE spherical expansion.

One periodic system at a time, written to be read against featomic's
``calculators/lode/spherical_expansion.rs``: k-vectors of a half-space below the
cutoff (``math/k_vectors.rs``), structure factors, real spherical harmonics in
featomic's convention, ``phase(l)``, ``4 pi / V``, the k = 0 term and the centre-atom
term. Radial integrals and the density's Fourier transform come from
:class:`rascaline_e3nn._lode_radial.LodeRadialIntegral`.
"""

import math
from typing import Dict, List, Tuple

import numpy as np
import torch
from e3nn import o3

from rascaline_e3nn._conventions import change_of_basis
from rascaline_e3nn._lode_radial import LodeRadialIntegral


def k_vectors(cell: np.ndarray, k_cutoff: float) -> np.ndarray:
    """The k-vectors featomic sums over, ``[K, 3]``, in featomic's order.

    ``cell`` holds the lattice vectors as rows. featomic keeps ``n1 > 0``, or
    ``n1 = 0, n2 > 0``, or ``n1 = n2 = 0, n3 > 0``, with ``|k| < k_cutoff``.
    """
    reciprocal = 2.0 * math.pi * np.linalg.inv(cell.T)
    b1, b2, b3 = reciprocal
    m = reciprocal @ reciprocal.T
    k_volume = np.linalg.det(reciprocal)
    n1_max = int(math.sqrt(m[1, 1] * m[2, 2] - m[1, 2] * m[1, 2]) / k_volume * k_cutoff)
    n2_max = int(math.sqrt(m[2, 2] * m[0, 0] - m[2, 0] * m[2, 0]) / k_volume * k_cutoff)
    n3_max = int(math.sqrt(m[0, 0] * m[1, 1] - m[0, 1] * m[0, 1]) / k_volume * k_cutoff)

    result: List[np.ndarray] = []

    def add(k):
        if k @ k < k_cutoff * k_cutoff:
            result.append(k)

    for n3 in range(1, n3_max + 1):
        add(n3 * b3)
    for n2 in range(1, n2_max + 1):
        for n3 in range(-n3_max, n3_max + 1):
            add(n2 * b2 + n3 * b3)
    for n1 in range(1, n1_max + 1):
        for n2 in range(-n2_max, n2_max + 1):
            for n3 in range(-n3_max, n3_max + 1):
                add(n1 * b1 + n2 * b2 + n3 * b3)
    return np.array(result).reshape(-1, 3)


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
    kvecs = k_vectors(cell, radial.k_cutoff)
    norms = np.sqrt(np.sum(kvecs**2, axis=1))
    directions = kvecs / norms[:, None]
    volume = abs(np.linalg.det(cell))
    global_factor = 4.0 * math.pi / volume

    k_torch = torch.tensor(norms, dtype=torch.float64)
    with torch.no_grad():
        integrals = [i.numpy() for i in radial(k_torch)]
        density = radial.density_fourier(k_torch).numpy()
    k0_term = radial.k0_term.numpy()
    center_term = radial.center_term.numpy()
    exponent = radial.exponent

    n_atoms = positions.shape[0]
    unique_types = sorted(set(int(t) for t in types))
    n_radial = radial.max_radial + 1

    result = {}
    for l in range(radial.max_angular + 1):
        harmonics = real_spherical_harmonics(l, directions)
        for center_type in unique_types:
            centers = [i for i in range(n_atoms) if types[i] == center_type]
            for neighbor_type in unique_types:
                block = np.zeros((len(centers), 2 * l + 1, n_radial))
                for row, i in enumerate(centers):
                    if l == 0 and neighbor_type == center_type:
                        block[row, 0, :] -= center_term
                    if l == 0 and (exponent == 0 or exponent > 3):
                        for j in range(n_atoms):
                            if types[j] == neighbor_type:
                                block[row, 0, :] += global_factor * k0_term
                    for ik in range(len(norms)):
                        structure_factor = 0.0
                        for j in range(n_atoms):
                            if types[j] != neighbor_type:
                                continue
                            kr = kvecs[ik] @ (positions[i] - positions[j])
                            if l % 2 == 0:
                                structure_factor += 2.0 * math.cos(kr)
                            else:
                                structure_factor += 2.0 * math.sin(kr)
                        prefactor = global_factor * phase(l) * density[ik] * structure_factor
                        block[row] += prefactor * np.outer(harmonics[ik], integrals[l][ik])
                result[(l, center_type, neighbor_type)] = block
    return result
