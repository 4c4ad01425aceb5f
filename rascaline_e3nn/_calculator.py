"""Layouts of featomic calculators, read from their hyper-parameters."""

import json
from typing import Dict, List, Sequence

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

#: featomic calculators whose output is a (lambda, sigma, type, type) expansion
SUPPORTED = ("spherical_expansion", "lode_spherical_expansion", "spherical_expansion_by_pair")
#: key names beside (o3_lambda, o3_sigma), and sample names, of each
_KEY_NAMES = {
    "spherical_expansion": ["center_type", "neighbor_type"],
    "lode_spherical_expansion": ["center_type", "neighbor_type"],
    "spherical_expansion_by_pair": ["first_atom_type", "second_atom_type"],
}
_SAMPLE_NAMES = {
    "spherical_expansion": ["system", "atom"],
    "lode_spherical_expansion": ["system", "atom"],
    "spherical_expansion_by_pair": [
        "system", "first_atom", "second_atom", "cell_shift_a", "cell_shift_b", "cell_shift_c"
    ],
}


def _radial_size(radial: dict, where: str) -> int:
    kind = radial.get("type")
    if kind == "Gto":
        return int(radial["max_radial"]) + 1
    if kind == "Tabulated":
        return len(radial["points"][0]["values"])
    raise ValueError(f"unsupported radial basis {kind!r} in {where}")


def radial_sizes(parameters: dict) -> Dict[int, int]:
    """Number of radial functions for each angular channel of featomic hypers.

    >>> radial_sizes({"basis": {"type": "TensorProduct", "max_angular": 2,
    ...     "radial": {"type": "Gto", "max_radial": 3}}})
    {0: 4, 1: 4, 2: 4}
    """
    basis = parameters["basis"]
    kind = basis.get("type")
    if kind == "TensorProduct":
        n = _radial_size(basis["radial"], "basis.radial")
        return {l: n for l in range(int(basis["max_angular"]) + 1)}
    if kind == "Explicit":
        sizes = {
            int(l): _radial_size(r, f"basis.by_angular[{l}]")
            for l, r in basis["by_angular"].items()
        }
        return dict(sorted(sizes.items()))
    raise ValueError(f"unsupported expansion basis {kind!r}")


def template_from_calculator(calculator, atom_types: Sequence[int]) -> TensorMap:
    """An empty (zero-sample) TensorMap with the keys, components and properties
    ``calculator`` gives for a batch where every pair of ``atom_types`` occurs."""
    name = getattr(calculator, "c_name", None)
    if name not in SUPPORTED:
        raise ValueError(
            f"from_calculator supports featomic-torch calculators {SUPPORTED}, got "
            f"{type(calculator).__name__} ({name}); build the module from a template "
            "TensorMap instead"
        )
    given = list(atom_types)  # read once: a generator is consumed by the first read
    types = sorted({int(t) for t in given})
    if len(types) == 0 or len(types) != len(given):
        raise ValueError(f"atom_types must be distinct and non-empty, got {given}")
    sizes = radial_sizes(json.loads(calculator.parameters))

    keys: List[List[int]] = []
    blocks: List[TensorBlock] = []
    sample_names = _SAMPLE_NAMES[name]
    samples = Labels(sample_names, torch.zeros((0, len(sample_names)), dtype=torch.int32))
    # featomic's key order: center (first) type, neighbour (second) type, then o3_lambda
    for center in types:
        for neighbor in types:
            for l, n_radial in sizes.items():
                components = [Labels(["o3_mu"], torch.arange(-l, l + 1).reshape(-1, 1))]
                properties = Labels(["n"], torch.arange(n_radial).reshape(-1, 1))
                keys.append([l, 1, center, neighbor])
                blocks.append(
                    TensorBlock(
                        values=torch.zeros((0, 2 * l + 1, n_radial), dtype=torch.float64),
                        samples=samples,
                        components=components,
                        properties=properties,
                    )
                )
    names = ["o3_lambda", "o3_sigma"] + _KEY_NAMES[name]
    return TensorMap(Labels(names, torch.tensor(keys, dtype=torch.int32)), blocks)
