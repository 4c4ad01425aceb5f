"""Quickstart: LODE features of a small real structure -> e3nn, and back.

Computes featomic-torch's ``LodeSphericalExpansion`` of a periodic box (two water
molecules and a sodium ion in a skewed cell, the structure embedded in
``rascaline_e3nn.check``: no download), converts it with
``TensorMapToIrreps`` for an e3nn ``Linear`` layer predicting a per-atom scalar and
vector, checks the equivariance of the whole pipeline under a proper and an improper
rotation of the structure, and converts the prediction back to a metatensor
``TensorMap`` with ``IrrepsToTensorMap``.

Run with ``python examples/quickstart.py``.
"""

import argparse
import os
import sys

import featomic.torch as featomic
import torch
from e3nn import o3
from metatomic.torch import System

from rascaline_e3nn import IrrepsToTensorMap, TensorMapToIrreps
# two water molecules and a sodium ion in a skewed periodic box (Å)
from rascaline_e3nn.check import DEFAULT_CELL as CELL
from rascaline_e3nn.check import DEFAULT_POSITIONS as POSITIONS
from rascaline_e3nn.check import DEFAULT_TYPES as TYPES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_system, rotate  # noqa: E402


def transformed(R: torch.Tensor) -> System:
    """The structure with positions and cell transformed by R (proper or improper)."""
    return rotate(make_system(TYPES, POSITIONS, CELL), R)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-angular", type=int, default=4)
    parser.add_argument("--max-radial", type=int, default=3)
    args = parser.parse_args()
    # e3nn builds its Wigner matrices in the default dtype
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)

    calculator = featomic.LodeSphericalExpansion(
        density={"type": "SmearedPowerLaw", "smearing": 1.0, "exponent": 1},
        basis={
            "type": "TensorProduct",
            "max_angular": args.max_angular,
            "radial": {"type": "Gto", "max_radial": args.max_radial, "radius": 3.0},
        },
    )
    to_irreps = TensorMapToIrreps.from_calculator(calculator, atom_types=[1, 8, 11])
    print(f"featomic LODE keys -> {to_irreps}")
    print(f"irreps_out = {to_irreps.irreps_out}  (dim {to_irreps.irreps_out.dim})")

    irreps_out = o3.Irreps("1x0e + 1x1o")  # a per-atom scalar and vector
    model = torch.nn.Sequential(calculator, to_irreps, o3.Linear(to_irreps.irreps_out, irreps_out))

    identity = torch.eye(3)
    features = calculator([transformed(identity)])
    # the flat tensor and the Labels of its rows, from one pass over the metadata
    x, samples = to_irreps.forward_with_samples(features)
    print(f"rows: {samples.names}, shape {tuple(x.shape)}")

    y = model([transformed(identity)])
    R = o3.rand_matrix()
    for name, Q in (("proper", R), ("improper", -R)):
        y_rotated = model([transformed(Q)])
        expected = y @ irreps_out.D_from_matrix(Q).T
        error = (y_rotated - expected).abs().max().item()
        print(f"equivariance under a {name} rotation: max error {error:.1e}")
        assert error < 1e-10, "the pipeline is not equivariant"

    to_tensor_map = IrrepsToTensorMap(irreps_out)
    prediction = to_tensor_map(y.detach(), samples)
    print("prediction back as a TensorMap, in featomic's conventions:")
    print(prediction)


if __name__ == "__main__":
    main()
