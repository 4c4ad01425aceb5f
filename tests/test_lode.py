"""``LodeSphericalExpansion`` against featomic's, and the physics it must respect.

featomic-torch's ``LodeSphericalExpansion`` is the oracle: values, metadata and
position gradients are compared with it on random triclinic periodic systems; cell
gradients with central finite differences of featomic's values under strain (featomic
gives no cell gradients). The physical checks (supercells, rotations, translations,
permutations) do not use featomic.
"""

import subprocess
import sys
import textwrap

import featomic.torch as ft
import numpy as np
import pytest
import torch
from e3nn import o3
from metatensor.torch import Labels
from metatomic.torch import System

import rascaline_e3nn
from rascaline_e3nn import LodeSphericalExpansion, TensorMapToIrreps
from rascaline_e3nn._conventions import change_of_basis
from _systems import DEVICES, accurate_rotations


def random_system(rng, n_atoms, types, scale=1.0, dtype=torch.float64):
    """A random triclinic periodic system: a cubic-ish cell of side ~6 A sheared at
    random, atoms anywhere in it."""
    cell = (np.eye(3) * 6.0 + rng.normal(size=(3, 3)) * 1.2) * scale
    if np.linalg.det(cell) < 0:
        cell[0] *= -1
    positions = rng.uniform(size=(n_atoms, 3)) @ cell
    return System(
        types=torch.tensor(rng.choice(types, size=n_atoms), dtype=torch.int32),
        positions=torch.tensor(positions, dtype=dtype),
        cell=torch.tensor(cell, dtype=dtype),
        pbc=torch.tensor([True, True, True]),
    )


def random_batch(seed, n_types, n_systems=3, max_atoms=6):
    rng = np.random.default_rng(seed)
    types = [1, 8, 11, 17][:n_types]
    systems = []
    for _ in range(n_systems):
        n = int(rng.integers(2, max_atoms + 1))
        systems.append(random_system(rng, n, types))
    return systems


def hypers(exponent=1, max_angular=3, max_radial=2, center_atom_weight=1.0, spline=True,
           smearing=1.0, radius=3.0):
    density = {"type": "SmearedPowerLaw", "smearing": smearing, "exponent": exponent,
               "center_atom_weight": center_atom_weight}
    basis = {"type": "TensorProduct", "max_angular": max_angular,
             "radial": {"type": "Gto", "max_radial": max_radial, "radius": radius}}
    if not spline:
        basis["spline_accuracy"] = None
    return {"density": density, "basis": basis}


def largest(tensor):
    return max((float(b.values.abs().max()) for b in tensor.blocks() if b.values.numel() > 0), default=1.0)


def assert_same_tensor_map(reference, actual, tolerance):
    """Same keys, samples, components and properties, in the same order; values
    within ``tolerance`` of each block's largest value (of the map's largest value
    for blocks that are zero by symmetry, e.g. odd l around a lone atom)."""
    assert actual.keys == reference.keys
    everywhere = largest(reference)
    assert torch.equal(actual.keys.values, reference.keys.values)
    worst = 0.0
    for key, expected in reference.items():
        block = actual.block(key)
        assert block.samples == expected.samples
        assert torch.equal(block.samples.values, expected.samples.values)
        assert block.components == expected.components
        assert block.properties == expected.properties
        assert torch.equal(block.properties.values, expected.properties.values)
        assert len(block.gradients_list()) == 0
        if expected.values.numel() == 0:
            assert block.values.shape == expected.values.shape
            continue
        scale = float(expected.values.abs().max())
        if scale < 1e-12 * everywhere:
            scale = everywhere
        error = float((block.values - expected.values).abs().max() / scale)
        worst = max(worst, error)
        assert error <= tolerance, (key, error)
    return worst


def tolerance(exponent):
    # featomic's own erfc is accurate to ~1e-10: even exponents >= 2 go through it
    return 1e-9 if exponent >= 2 and exponent % 2 == 0 else 1e-10


# ---------------------------------------------------------------- values, metadata


@pytest.mark.parametrize(
    "exponent, max_angular, n_types, center_atom_weight, spline, seed",
    [
        (1, 4, 2, 1.0, True, 0),
        (1, 6, 3, 0.3, True, 1),
        (1, 3, 4, 0.0, False, 2),
        (0, 4, 2, 0.5, True, 3),
        (0, 2, 1, 1.0, False, 4),
        (2, 3, 3, 0.7, True, 5),
        (3, 5, 2, 1.0, True, 6),
        (3, 2, 2, 0.2, False, 7),
        (4, 3, 3, 1.0, True, 8),
        (5, 3, 2, 0.4, True, 9),
        (6, 4, 2, 1.0, False, 10),
        (6, 2, 3, 0.0, True, 11),
        (7, 3, 2, 0.6, True, 12),
        (8, 2, 2, 1.0, True, 13),
        (9, 3, 2, 0.5, False, 14),
    ],
)
def test_values_equal_featomic(exponent, max_angular, n_types, center_atom_weight, spline, seed):
    h = hypers(exponent, max_angular, 3, center_atom_weight, spline)
    systems = random_batch(seed, n_types)
    reference = ft.LodeSphericalExpansion(**h)(systems)
    actual = LodeSphericalExpansion(**h)(systems)
    assert_same_tensor_map(reference, actual, tolerance(exponent))


def test_k_cutoff_and_smearing_equal_featomic():
    h = hypers(1, 3, 2, smearing=0.7, radius=2.5)
    systems = random_batch(20, 2)
    for k_cutoff in [2.0, 4.5]:
        reference = ft.LodeSphericalExpansion(**h, k_cutoff=k_cutoff)(systems)
        actual = LodeSphericalExpansion(**h, k_cutoff=k_cutoff)(systems)
        assert_same_tensor_map(reference, actual, 1e-10)


KEY_NAMES = ["o3_lambda", "o3_sigma", "center_type", "neighbor_type"]


@pytest.mark.parametrize(
    "selection",
    [
        {"selected_keys": Labels(KEY_NAMES, torch.tensor([[1, 1, 8, 1], [0, 1, 1, 1]]))},
        # keys featomic would not produce (absent pair, absent type): empty blocks
        {"selected_keys": Labels(KEY_NAMES, torch.tensor([[1, 1, 8, 11], [0, 1, 6, 1]]))},
        {"selected_keys": Labels(["o3_lambda", "center_type"], torch.tensor([[1, 8]]))},
        {"selected_samples": Labels(["atom"], torch.tensor([[0], [2]]))},
        {"selected_samples": Labels(["system", "atom"], torch.tensor([[1, 0], [0, 3], [1, 7]]))},
        {"selected_properties": Labels(["n"], torch.tensor([[2], [0]]))},
    ],
    ids=["keys", "absent-keys", "key-columns", "atoms", "samples", "properties"],
)
def test_selections_equal_featomic(selection):
    rng = np.random.default_rng(30)
    systems = [random_system(rng, 5, [1, 8]), random_system(rng, 4, [1, 11])]
    h = hypers(1, 2, 2)
    reference = ft.LodeSphericalExpansion(**h)(systems, **selection)
    actual = LodeSphericalExpansion(**h)(systems, **selection)
    assert_same_tensor_map(reference, actual, 1e-10)


# ---------------------------------------------------------------- gradients


def with_grad(systems, cell=False):
    return [
        System(
            types=s.types,
            positions=s.positions.detach().clone().requires_grad_(True),
            cell=s.cell.detach().clone().requires_grad_(cell),
            pbc=s.pbc,
        )
        for s in systems
    ]


def weighted_sum(tensor, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for block in tensor.blocks():
        w = torch.randn(block.values.shape, generator=generator, dtype=block.values.dtype)
        total = total + (block.values * w).sum()
    return total


@pytest.mark.parametrize("exponent, spline", [(1, True), (0, False), (3, True), (6, True)])
def test_position_gradients_equal_featomic(exponent, spline):
    h = hypers(exponent, 3, 2, 0.5, spline)
    systems = random_batch(40 + exponent, 3)
    grads = []
    for calculator in [ft.LodeSphericalExpansion(**h), LodeSphericalExpansion(**h)]:
        inputs = with_grad(systems)
        loss = weighted_sum(calculator(inputs))
        grads.append(torch.autograd.grad(loss, [s.positions for s in inputs]))
    for expected, actual in zip(*grads):
        assert (actual - expected).abs().max() <= tolerance(exponent) * expected.abs().max()


def strained(systems, strain):
    """Positions and cell deformed by ``1 + strain`` (rows are vectors)."""
    deformation = torch.eye(3, dtype=strain.dtype) + strain
    return [
        System(types=s.types, positions=s.positions @ deformation,
               cell=s.cell @ deformation, pbc=s.pbc)
        for s in systems
    ]


@pytest.mark.parametrize("exponent, spline", [(1, True), (0, False), (4, True)])
def test_strain_gradients_equal_finite_differences_of_featomic(exponent, spline):
    h = hypers(exponent, 3, 2, 0.5, spline)
    systems = random_batch(50 + exponent, 2, n_systems=2)
    strain = torch.zeros((3, 3), dtype=torch.float64, requires_grad=True)
    loss = weighted_sum(LodeSphericalExpansion(**h)(strained(systems, strain)))
    (gradient,) = torch.autograd.grad(loss, strain)

    featomic = ft.LodeSphericalExpansion(**h)
    step = 1e-5
    expected = torch.zeros((3, 3), dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            delta = torch.zeros((3, 3), dtype=torch.float64)
            delta[i, j] = step
            plus = weighted_sum(featomic(strained(systems, delta)))
            minus = weighted_sum(featomic(strained(systems, -delta)))
            expected[i, j] = (plus - minus) / (2 * step)
    assert (gradient - expected).abs().max() <= 1e-7 * expected.abs().max()


def test_cell_gradients_equal_finite_differences_of_featomic():
    # the cell alone, Cartesian positions fixed
    h = hypers(1, 2, 2)
    systems = random_batch(60, 2, n_systems=1)
    inputs = with_grad(systems, cell=True)
    loss = weighted_sum(LodeSphericalExpansion(**h)(inputs))
    (gradient,) = torch.autograd.grad(loss, inputs[0].cell)
    featomic = ft.LodeSphericalExpansion(**h)
    s = systems[0]
    step = 1e-5
    expected = torch.zeros((3, 3), dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            values = []
            for sign in [1, -1]:
                cell = s.cell.clone()
                cell[i, j] += sign * step
                moved = System(types=s.types, positions=s.positions, cell=cell, pbc=s.pbc)
                values.append(weighted_sum(featomic([moved])))
            expected[i, j] = (values[0] - values[1]) / (2 * step)
    assert (gradient - expected).abs().max() <= 1e-7 * expected.abs().max()


def test_gradcheck_and_gradgradcheck():
    calculator = LodeSphericalExpansion(**hypers(1, 2, 1, 0.5))
    rng = np.random.default_rng(70)
    system = random_system(rng, 3, [1, 8])
    types, pbc = system.types, system.pbc

    def features(positions, cell):
        tensor = calculator([System(types=types, positions=positions, cell=cell, pbc=pbc)])
        return torch.cat([b.values.reshape(-1) for b in tensor.blocks()])[::7]

    inputs = (system.positions.clone().requires_grad_(True),
              system.cell.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(features, inputs)
    assert torch.autograd.gradgradcheck(features, inputs)


def test_low_memory_equals_default():
    h = hypers(1, 2, 1)
    systems = random_batch(80, 2)
    results = []
    for low_memory in [False, True]:
        calculator = LodeSphericalExpansion(**h, low_memory=low_memory)
        calculator.chunk_size = 1000  # several chunks
        inputs = with_grad(systems, cell=True)
        loss = weighted_sum(calculator(inputs))
        leaves = [inputs[0].positions, inputs[1].cell]
        first = torch.autograd.grad(loss, leaves, create_graph=True)
        second = torch.autograd.grad(sum((g ** 2).sum() for g in first), leaves)
        results.append([loss.detach(), *[g.detach() for g in first], *second])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_chunks_do_not_change_the_values():
    h = hypers(1, 3, 2)
    systems = random_batch(81, 3)
    calculator = LodeSphericalExpansion(**h)
    whole = calculator(systems)
    calculator.chunk_size = 17
    assert_same_tensor_map(whole, calculator(systems), 1e-14)


# ---------------------------------------------------------------- physics, without featomic


def test_supercell_gives_each_atom_its_image_features():
    h = hypers(1, 3, 2, 0.5)
    rng = np.random.default_rng(90)
    system = random_system(rng, 4, [1, 8])
    repeats = torch.tensor([2, 1, 3])
    shifts = torch.cartesian_prod(*[torch.arange(int(r)) for r in repeats]).to(torch.float64)
    positions = (system.positions[None] + (shifts @ system.cell)[:, None]).reshape(-1, 3)
    supercell = System(
        types=system.types.repeat(len(shifts)),
        positions=positions,
        cell=system.cell * repeats[:, None],
        pbc=system.pbc,
    )
    calculator = LodeSphericalExpansion(**h)
    unit = calculator([system])
    big = calculator([supercell])
    n = system.types.shape[0]
    scale = largest(unit)
    for key, block in big.items():
        expected = unit.block(key)
        atoms = block.samples.values[:, 1] % n
        image = torch.tensor([expected.samples.position([0, int(a)]) for a in atoms])
        assert torch.allclose(block.values, expected.values[image], rtol=0, atol=1e-12 * scale)


def rotated(system, R):
    cell = system.cell @ R.T
    if torch.det(cell) < 0:
        cell = -cell  # the same lattice, right-handed
    return System(types=system.types, positions=system.positions @ R.T, cell=cell, pbc=system.pbc)


@pytest.mark.parametrize("improper", [False, True])
def test_rotations_give_featomic_wigner_matrices(improper, float64_default):
    h = hypers(1, 4, 2, 0.5)
    rng = np.random.default_rng(100)
    system = random_system(rng, 5, [1, 8])
    calculator = LodeSphericalExpansion(**h)
    before = calculator([system])
    scale = largest(before)
    for R in accurate_rotations(2):
        if improper:
            R = -R
        after = calculator([rotated(system, R)])
        for key, block in before.items():
            l = int(key["o3_lambda"])
            # featomic's matrix: x_e3nn = C x_featomic, so D_featomic = C^T D_e3nn C
            C = change_of_basis(l)
            D = C.T @ o3.Irrep(l, (-1) ** l).D_from_matrix(R) @ C
            expected = torch.einsum("mn,snp->smp", D, block.values)
            assert (after.block(key).values - expected).abs().max() <= 1e-11 * scale


def test_translations_and_permutations_change_nothing():
    h = hypers(1, 3, 2, 0.5)
    rng = np.random.default_rng(110)
    system = random_system(rng, 6, [1, 8, 11])
    calculator = LodeSphericalExpansion(**h)
    reference = calculator([system])

    moved = System(types=system.types, positions=system.positions + torch.tensor([1.3, -7.2, 30.1], dtype=torch.float64),
                   cell=system.cell, pbc=system.pbc)
    assert_same_tensor_map(reference, calculator([moved]), 1e-12)

    order = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = System(types=system.types[order], positions=system.positions[order],
                      cell=system.cell, pbc=system.pbc)
    result = calculator([permuted])
    scale = largest(reference)
    for key, block in reference.items():
        other = result.block(key)
        new_index = {int(old): new for new, old in enumerate(order)}
        rows = [other.samples.position([0, new_index[int(a)]]) for a in block.samples.values[:, 1]]
        assert torch.allclose(other.values[torch.tensor(rows)], block.values, rtol=0,
                              atol=1e-12 * scale)


# ---------------------------------------------------------------- e3nn path


@pytest.mark.parametrize("basis", ["e3nn", "featomic"])
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_to_irreps_equals_the_adapter_on_the_tensor_map(basis, layout):
    calculator = LodeSphericalExpansion(**hypers(1, 3, 2, 0.5))
    systems = random_batch(120, 3)
    atom_types = [1, 8, 11, 17]  # 17 absent from the batch: zeros
    adapter = TensorMapToIrreps.from_calculator(calculator, atom_types, basis=basis, layout=layout)
    direct = calculator.to_irreps(atom_types, basis=basis, layout=layout)
    assert direct.irreps_out == adapter.irreps_out
    expected = adapter(calculator(systems))
    actual = direct(systems)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= 1e-14 * expected.abs().max()


def test_to_irreps_refuses_unknown_types():
    calculator = LodeSphericalExpansion(**hypers(1, 2, 1))
    direct = calculator.to_irreps([1, 8])
    systems = random_batch(130, 3)  # types 1, 8, 11
    with pytest.raises(ValueError, match=r"atom types \[11\] are not among"):
        direct(systems)


# ---------------------------------------------------------------- TorchScript


LOAD_AND_RUN = """
import sys
import numpy as np
import torch
import metatomic.torch  # noqa: F401 (TorchScript classes of metatensor and metatomic)
from metatomic.torch import System

assert "rascaline_e3nn" not in sys.modules
data = torch.load(sys.argv[2])
systems = [
    System(types=t, positions=p.requires_grad_(True), cell=c.requires_grad_(True),
           pbc=torch.tensor([True] * 3))
    for t, p, c in data["systems"]
]
module = torch.jit.load(sys.argv[1])
out = module(systems)
if not isinstance(out, torch.Tensor):
    out = torch.cat([b.values.reshape(-1) for b in out.blocks()])
loss = (out * data["weights"]).sum()
grads = torch.autograd.grad(loss, [s.positions for s in systems] + [s.cell for s in systems])
torch.save({"out": out.detach(), "grads": grads}, sys.argv[3])
"""


def run_module(module, systems, weights):
    inputs = with_grad(systems, cell=True)
    out = module(inputs)
    if not isinstance(out, torch.Tensor):
        out = torch.cat([b.values.reshape(-1) for b in out.blocks()])
    loss = (out * weights).sum()
    grads = torch.autograd.grad(loss, [s.positions for s in inputs] + [s.cell for s in inputs])
    return out.detach(), grads


@pytest.mark.parametrize("kind", ["tensor_map", "irreps"])
def test_scripted_equals_eager_and_reloaded_in_a_fresh_process(kind, tmp_path):
    calculator = LodeSphericalExpansion(**hypers(1, 3, 2, 0.5))
    module = calculator if kind == "tensor_map" else calculator.to_irreps([1, 8, 11])
    systems = random_batch(140, 3)
    out, _ = run_module(module, systems, 1.0)
    weights = torch.randn(out.shape, dtype=torch.float64)

    eager = run_module(module, systems, weights)
    scripted_module = torch.jit.script(module)
    scripted = run_module(scripted_module, systems, weights)
    assert torch.equal(eager[0], scripted[0])
    # TorchScript's autograd may add a tensor's gradient contributions in another
    # order (the cell's collect many terms): equal up to rounding
    for a, b in zip(eager[1], scripted[1]):
        assert torch.allclose(a, b, rtol=0, atol=1e-13 * a.abs().max())

    path = tmp_path / "module.pt"
    scripted_module.save(str(path))
    torch.save({"systems": [(s.types, s.positions, s.cell) for s in systems], "weights": weights},
               tmp_path / "data.pt")
    subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(path), str(tmp_path / "data.pt"),
         str(tmp_path / "result.pt")],
        check=True,
        cwd=tmp_path,
    )
    reloaded = torch.load(tmp_path / "result.pt")
    assert torch.equal(reloaded["out"], eager[0])
    for a, b in zip(eager[1], reloaded["grads"]):
        assert torch.allclose(a, b, rtol=0, atol=1e-13 * a.abs().max())


# ---------------------------------------------------------------- errors


def test_explicit_gradients_point_to_autograd():
    calculator = LodeSphericalExpansion(**hypers(1, 2, 1))
    systems = random_batch(150, 2, n_systems=1)
    for module in [calculator, torch.jit.script(calculator)]:
        with pytest.raises((ValueError, torch.jit.Error), match="use autograd"):
            module(systems, gradients=["positions"])


def test_non_periodic_systems_are_refused():
    calculator = LodeSphericalExpansion(**hypers(1, 2, 1))
    system = random_batch(160, 2, n_systems=1)[0]
    for pbc in [[False] * 3, [True, True, False]]:
        cell = system.cell * torch.tensor(pbc, dtype=torch.float64)[:, None]
        open_system = System(types=system.types, positions=system.positions, cell=cell,
                             pbc=torch.tensor(pbc))
        with pytest.raises(ValueError, match="LODE can only be used with periodic systems"):
            calculator([open_system])


@pytest.mark.parametrize(
    "change, culprit",
    [
        (lambda h: h["density"].update(type="Gaussian"), "Gaussian"),
        (lambda h: h["density"].update(exponent=10), "exponent"),
        (lambda h: h["density"].update(scaling={"type": "Willatt2018", "rate": 1, "scale": 1, "exponent": 1}), "scaling"),
        (lambda h: h["basis"].update(type="Explicit"), "Explicit"),
        (lambda h: h["basis"]["radial"].update(type="Tabulated"), "Tabulated"),
    ],
    ids=["density-type", "exponent", "scaling", "explicit-basis", "tabulated-radial"],
)
def test_what_featomic_accepts_and_this_does_not_is_named(change, culprit):
    h = hypers(1, 2, 1)
    change(h)
    with pytest.raises(ValueError, match=culprit):
        LodeSphericalExpansion(**h)


def test_top_level_export_and_from_calculator():
    assert rascaline_e3nn.LodeSphericalExpansion is LodeSphericalExpansion
    calculator = LodeSphericalExpansion(**hypers(1, 2, 1))
    assert calculator.c_name == ft.LodeSphericalExpansion(**hypers(1, 2, 1)).c_name
    adapter = TensorMapToIrreps.from_calculator(calculator, [1, 8])
    assert str(adapter.irreps_out) == "4x0e+4x1o+4x2e"


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("device", DEVICES)
def test_device_results_equal_cpu(device):
    calculator = LodeSphericalExpansion(**hypers(1, 3, 2, 0.5))
    systems = random_batch(170, 3)
    expected = calculator(systems)
    moved = [s.to(device) for s in systems]
    actual = calculator.to(device)(moved)
    assert actual.device.type == torch.device(device).type
    assert_same_tensor_map(expected, actual.to("cpu"), 1e-13)
    direct = calculator.to_irreps([1, 8, 11])
    assert torch.allclose(direct(moved).cpu(), direct.to("cpu")(systems), rtol=0, atol=1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_to_irreps_reads_the_host_once():
    calculator = LodeSphericalExpansion(**hypers(1, 3, 2)).to("cuda")
    direct = calculator.to_irreps([1, 8, 11])
    systems = [s.to("cuda") for s in random_batch(180, 3)]
    direct(systems)
    torch.cuda.synchronize()
    import warnings

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            direct(systems)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    synchronizing = [w for w in caught if "synchroniz" in str(w.message)]
    # one read (cells and types); the upload of the k-vectors and indices is the other
    assert len(synchronizing) <= 2, [str(w.message) for w in synchronizing]


# ---------------------------------------------------------------- the sharp k cutoff


def rock_salt(a):
    """The 8-atom conventional cell of rock salt, side ``a``."""
    fractions = torch.tensor([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]],
                             dtype=torch.float64)
    return System(
        types=torch.tensor([11] * 4 + [17] * 4, dtype=torch.int32),
        positions=torch.cat([fractions, fractions + 0.5]) * a,
        cell=torch.eye(3, dtype=torch.float64) * a,
        pbc=torch.tensor([True] * 3),
    )


def test_sharp_k_cutoff_jumps_as_featomic():
    """The shell of the 24 k-vectors (3, 1, 1) of a cubic cell crosses the default
    cutoff 1.2 pi / smearing at a = 2 pi sqrt(11) / k_cutoff: the features jump there,
    by 1e-3 of their largest value, in featomic's descriptor as in this one."""
    h = hypers(1, 4, 3)
    side = 2 * np.pi * np.sqrt(11) / (1.2 * np.pi)
    jumps = []
    for calculator in [ft.LodeSphericalExpansion(**h), LodeSphericalExpansion(**h)]:
        below = calculator([rock_salt(side * (1 - 1e-9))])
        above = calculator([rock_salt(side * (1 + 1e-9))])
        jumps.append(max(
            float((x.values - y.values).abs().max()) for x, y in zip(below.blocks(), above.blocks())
        ) / largest(below))
    featomic_jump, our_jump = jumps
    assert 5e-4 < our_jump < 2e-3
    assert abs(our_jump - featomic_jump) < 1e-9


def test_float32_systems_give_float32_features():
    h = hypers(1, 3, 2, 0.5)
    systems = random_batch(190, 2)
    calculator = LodeSphericalExpansion(**h)
    reference = calculator(systems)
    single = [System(types=s.types, positions=s.positions.float(), cell=s.cell.float(), pbc=s.pbc)
              for s in systems]
    result = calculator(single)
    scale = largest(reference)
    for key, block in reference.items():
        assert result.block(key).values.dtype == torch.float32
        assert (result.block(key).values.double() - block.values).abs().max() < 1e-5 * scale


# ---------------------------------------------------------------- state


def test_state_dict_holds_no_derived_table_and_casts_keep_float64(tmp_path):
    calculator = LodeSphericalExpansion(**hypers(1, 3, 2, 0.5))
    systems = random_batch(200, 2)
    expected = calculator(systems)
    scripted = torch.jit.script(LodeSphericalExpansion(**hypers(1, 3, 2, 0.5)))
    scripted.save(str(tmp_path / "lode.pt"))
    loaded = torch.jit.load(str(tmp_path / "lode.pt"))
    for module in [calculator, calculator.to_irreps([1, 8]), scripted, loaded]:
        assert len(module.state_dict()) == 0
    # another calculator's (empty) state changes nothing; casts leave the tables float64
    other = LodeSphericalExpansion(**hypers(0, 2, 1))
    for module in [LodeSphericalExpansion(**hypers(1, 3, 2, 0.5)), scripted, loaded]:
        module.load_state_dict(other.state_dict())
        module.float()
        module.half().double()
        module.to(torch.float32)
        assert_same_tensor_map(expected, module(systems), 1e-14)


def test_whole_models_pickle(tmp_path):
    calculator = LodeSphericalExpansion(**hypers(1, 2, 1, 0.5))
    model = torch.nn.ModuleDict({"lode": calculator, "irreps": calculator.to_irreps([1, 8])})
    systems = random_batch(210, 2)
    torch.save(model, tmp_path / "model.pt")
    reloaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(reloaded["irreps"](systems), model["irreps"](systems))
    assert_same_tensor_map(model["lode"](systems), reloaded["lode"](systems), 0.0)


def test_one_host_read_per_batch():
    """The cells and types of the batch, read once (``rascaline_e3nn::host_read``,
    which the profiler sees on the CPU too); the rest is uploads and device work."""
    calculator = LodeSphericalExpansion(**hypers(1, 3, 2))
    systems = random_batch(220, 3)
    direct = calculator.to_irreps([1, 8, 11])
    for module in [direct, torch.jit.script(direct)]:
        module(systems)
        with torch.profiler.profile() as profile:
            module(systems)
        reads = [e for e in profile.events() if e.name == "rascaline_e3nn::host_read"]
        assert len(reads) == 1
