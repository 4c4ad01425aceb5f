"""Measure the conventions: the Wigner-D matrices that featomic output really has.

``python -m rascaline_e3nn.check [structure]`` (any file ASE reads; a small embedded
periodic box of two waters and a sodium ion otherwise) computes a featomic
calculator's output for the structure and for copies rotated by random proper and
improper rotations, converts each with :py:class:`~rascaline_e3nn.TensorMapToIrreps`
in both bases, and measures, for every irrep segment, the matrix ``D`` with
``X_rotated ≈ X D^T`` (least squares over all rows and channels). It compares ``D``
with e3nn's ``Irrep.D_from_matrix(R)`` and with the same matrix in featomic's basis,
prints one line per (basis, irrep, rotation kind), and draws the measured and
expected matrices side by side (``--output``, default ``conventions.png``).

What it shows: ``basis="e3nn"`` output transforms with e3nn's matrices (to ~1e-12);
``basis="featomic"`` output transforms with featomic's own, which differ from e3nn's
for every l >= 1 (a permutation for l = 1, a dense rotation for l >= 2).

The same is available as :py:func:`check_conventions`. Reading a structure file
needs ``ase``, the picture ``matplotlib`` (``pip install "rascaline-e3nn[check]"``).
"""

import argparse
import contextlib
import json
import pathlib
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from e3nn import o3

from ._conventions import change_of_basis
from ._to_irreps import TensorMapToIrreps

__all__ = ["check_conventions", "format_table", "main", "plot_conventions"]

#: the embedded structure: two water molecules and a sodium ion in a skewed box (Å)
DEFAULT_TYPES = [8, 1, 1, 8, 1, 1, 11]
DEFAULT_POSITIONS = [
    [0.00, 0.00, 0.00],
    [0.96, 0.00, 0.00],
    [-0.24, 0.93, 0.00],
    [3.00, 3.00, 3.00],
    [3.96, 3.00, 3.00],
    [2.76, 3.93, 3.10],
    [1.50, 4.50, 0.50],
]
DEFAULT_CELL = [[6.0, 0.3, 0.0], [0.2, 5.5, 0.1], [0.0, 0.4, 6.2]]

#: default hyper-parameters of the two calculators (lmax 4: irreps l = 0..4)
DEFAULT_HYPERS = {
    "lode": {
        "density": {"type": "SmearedPowerLaw", "smearing": 1.0, "exponent": 1},
        "basis": {
            "type": "TensorProduct",
            "max_angular": 4,
            "radial": {"type": "Gto", "max_radial": 2, "radius": 3.0},
        },
    },
    "spherical-expansion": {
        "cutoff": {"radius": 4.0, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
        "density": {"type": "Gaussian", "width": 0.3},
        "basis": {
            "type": "TensorProduct",
            "max_angular": 4,
            "radial": {"type": "Gto", "max_radial": 2},
        },
    },
}
CALCULATORS = tuple(DEFAULT_HYPERS)
BASES = ("featomic", "e3nn")
#: above this, the e3nn basis is reported as not matching e3nn's matrices
TOLERANCE = 1e-10


@contextlib.contextmanager
def _float64_default():
    # e3nn builds the generators behind D_from_matrix in the default dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


class _Structure:
    """Types, positions, cell and periodicity, in float64."""

    def __init__(self, types, positions, cell, pbc):
        self.types = torch.as_tensor(types, dtype=torch.int32)
        self.positions = torch.as_tensor(positions, dtype=torch.float64).reshape(-1, 3)
        self.cell = torch.as_tensor(cell, dtype=torch.float64).reshape(3, 3)
        self.pbc = torch.as_tensor(pbc, dtype=torch.bool).reshape(3)

    @classmethod
    def default(cls) -> "_Structure":
        return cls(DEFAULT_TYPES, DEFAULT_POSITIONS, DEFAULT_CELL, [True, True, True])

    @classmethod
    def read(cls, path) -> "_Structure":
        try:
            import ase.io
        except ImportError:
            raise ImportError(
                f"reading {path} needs ase (pip install ase, or "
                '"rascaline-e3nn[check]"); without a file the embedded structure is used'
            ) from None
        atoms = ase.io.read(str(path), index=0)
        return cls.from_ase(atoms)

    @classmethod
    def from_ase(cls, atoms) -> "_Structure":
        pbc = [bool(p) for p in atoms.pbc]
        cell = atoms.cell.array if any(pbc) else [[0.0] * 3] * 3
        return cls(atoms.numbers, atoms.positions, cell, pbc)

    def system(self, R: torch.Tensor):
        """The structure transformed by R (proper or improper) as a metatomic System.

        Positions and cell vectors are rotated; a cell that an improper R makes
        left-handed gets its first vector negated: the same lattice, right-handed.
        """
        from metatomic.torch import System

        cell = self.cell @ R.T
        if bool(self.pbc.any()) and float(torch.det(cell)) < 0:
            cell[0] = -cell[0]
        return System(
            types=self.types, positions=self.positions @ R.T, cell=cell, pbc=self.pbc
        )


def _calculator(calculator, hypers):
    import featomic.torch as featomic

    if not isinstance(calculator, str):
        if hypers is not None:
            raise ValueError("hypers are only used with a calculator given by name")
        return calculator
    if calculator not in CALCULATORS:
        raise ValueError(f"calculator must be one of {CALCULATORS}, got {calculator!r}")
    hypers = DEFAULT_HYPERS[calculator] if hypers is None else hypers
    if calculator == "lode":
        return featomic.LodeSphericalExpansion(**hypers)
    return featomic.SphericalExpansion(**hypers)


def _rotations(n: int, seed: int) -> List[torch.Tensor]:
    """``n`` random proper rotations for which e3nn's ``D_from_matrix`` is itself
    accurate: e3nn recovers Euler angles from the matrix and, for some rotations,
    its ``1o`` matrix differs from the rotation by ~1e-12, which would be measured
    here as a disagreement of the data."""
    generator = torch.Generator().manual_seed(seed)
    rotations = []
    while len(rotations) < n:
        q = torch.randn(4, generator=generator, dtype=torch.float64)
        a, b, c, d = q / q.norm()
        R = torch.stack([
            torch.stack([a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)]),
            torch.stack([2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)]),
            torch.stack([2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]),
        ])
        if (o3.Irrep(1, -1).D_from_matrix(R) - R).abs().max() < 1e-14:
            rotations.append(R)
    return rotations


def _segments(x: torch.Tensor, irreps: o3.Irreps):
    """(irrep, values as [rows * mul, 2l+1]) for each segment of a mul_ir tensor."""
    for (mul, ir), sl in zip(irreps, irreps.slices()):
        yield ir, x[:, sl].reshape(-1, ir.dim)


def _fit(X: torch.Tensor, Y: torch.Tensor, ir) -> torch.Tensor:
    """D minimising ``|Y - X D^T|`` (least squares); fails on degenerate data."""
    singular = torch.linalg.svdvals(X)
    if singular.numel() < ir.dim or singular[-1] <= 1e-8 * singular[0]:
        raise ValueError(
            f"the features of irrep {ir} span fewer than its {ir.dim} components "
            "(a planar or linear structure, too few atoms or channels): its D "
            "cannot be measured; try a three-dimensional structure or more radial "
            "functions"
        )
    return torch.linalg.lstsq(X, Y).solution.T


def _measure(structure, calculator, n_rotations: int, seed: int):
    types = sorted({int(t) for t in structure.types})
    modules = {
        basis: TensorMapToIrreps.from_calculator(calculator, atom_types=types, basis=basis)
        for basis in BASES
    }
    irreps = modules["e3nn"].irreps_out

    def features(R):
        try:
            tensor = calculator([structure.system(R)])
        except RuntimeError as error:
            if "periodic" in str(error):
                raise ValueError(
                    f"{error}: LODE needs a periodic structure (a cell); "
                    "for a molecule use calculator='spherical-expansion'"
                ) from None
            raise
        return {basis: module(tensor) for basis, module in modules.items()}

    reference = features(torch.eye(3, dtype=torch.float64))
    rows: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    # the matrices of the first proper rotation, for the picture
    matrices: Dict[Tuple[str, str], torch.Tensor] = {}
    for i, R in enumerate(_rotations(n_rotations, seed)):
        for kind, Rm in (("proper", R), ("improper", -R)):
            rotated = features(Rm)
            for basis in BASES:
                pairs = zip(_segments(reference[basis], irreps), _segments(rotated[basis], irreps))
                for (ir, X), (_, Y) in pairs:
                    measured = _fit(X, Y, ir)
                    expected = ir.D_from_matrix(Rm)
                    C = change_of_basis(ir.l)  # x_e3nn = C x_featomic
                    featomic_D = C.T @ expected @ C
                    row = rows.setdefault((basis, str(ir), kind), {
                        "basis": basis, "irrep": str(ir), "l": ir.l, "rotation": kind,
                        "error_e3nn_D": 0.0, "error_featomic_D": 0.0,
                    })
                    row["error_e3nn_D"] = max(
                        row["error_e3nn_D"], float((measured - expected).abs().max())
                    )
                    row["error_featomic_D"] = max(
                        row["error_featomic_D"], float((measured - featomic_D).abs().max())
                    )
                    if i == 0 and kind == "proper":
                        matrices[(basis, str(ir))] = measured
                        matrices[("expected", str(ir))] = expected
    order = {str(ir): i for i, (_, ir) in enumerate(irreps)}
    table = sorted(rows.values(), key=lambda r: (
        BASES.index(r["basis"]), r["rotation"] == "improper", order[r["irrep"]]
    ))
    return table, matrices, irreps


def check_conventions(
    structure: Union[None, str, pathlib.Path, Any] = None,
    *,
    calculator: Union[str, torch.nn.Module] = "lode",
    hypers: Optional[Dict[str, Any]] = None,
    n_rotations: int = 2,
    seed: int = 0,
    output: Union[None, str, pathlib.Path] = None,
) -> List[Dict[str, Any]]:
    """Measure how featomic output, converted in each basis, transforms under
    rotations, and compare with e3nn's Wigner-D matrices.

    For each of ``n_rotations`` random rotations ``R`` and its improper partner
    ``-R``, the calculator's output for the rotated structure is converted by
    :py:class:`~rascaline_e3nn.TensorMapToIrreps` (``layout="mul_ir"``) with
    ``basis="featomic"`` and ``basis="e3nn"``; for every irrep segment, the matrix
    ``D`` solving ``X_rotated ≈ X D^T`` in the least-squares sense (over all rows and
    channels) is compared with e3nn's ``Irrep.D_from_matrix(R)`` and with that matrix
    in featomic's basis, ``C^T D_e3nn C`` (``x_e3nn = C x_featomic``).

    Parameters
    ----------
    structure : None, path or ase.Atoms
        ``None`` for the embedded periodic box (two waters and a sodium ion), a
        file that ``ase.io.read`` reads (its first frame), or an ``ase.Atoms``.
    calculator : {"lode", "spherical-expansion"} or featomic-torch calculator
        Which featomic calculator computes the features. LODE needs a periodic
        structure.
    hypers : dict, optional
        Hyper-parameters of a calculator given by name (its keyword arguments, as
        in featomic); defaults to lmax 4 and 3 radial functions.
    n_rotations : int
        How many random proper rotations (each also used as the improper ``-R``).
    seed : int
        Seed of the random rotations.
    output : path, optional
        Also draw the measured and expected matrices, per l, into this PNG file
        (needs matplotlib): see :py:func:`plot_conventions`.

    Returns
    -------
    list of dict
        One row per (basis, irrep, rotation kind) with keys ``basis``, ``irrep``,
        ``l``, ``rotation`` (``"proper"`` or ``"improper"``), ``error_e3nn_D`` and
        ``error_featomic_D``: the largest absolute difference, over the rotations,
        between the measured matrix and e3nn's, and featomic's.

    Examples
    --------
    >>> rows = check_conventions(n_rotations=1)
    >>> max(r["error_e3nn_D"] for r in rows if r["basis"] == "e3nn") < 1e-10
    True
    >>> sorted({r["l"] for r in rows if r["basis"] == "featomic" and r["error_e3nn_D"] > 0.1})
    [1, 2, 3, 4]
    """
    if structure is None:
        structure = _Structure.default()
    elif isinstance(structure, (str, pathlib.Path)):
        structure = _Structure.read(structure)
    else:
        structure = _Structure.from_ase(structure)
    if n_rotations < 1:
        raise ValueError(f"n_rotations must be at least 1, got {n_rotations}")

    with _float64_default():
        rows, matrices, irreps = _measure(
            structure, _calculator(calculator, hypers), n_rotations, seed
        )
    if output is not None:
        plot_conventions(matrices, irreps, output)
    return rows


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The rows of :py:func:`check_conventions` as a text table.

    >>> print(format_table([{"basis": "e3nn", "irrep": "1o", "rotation": "proper",
    ...                      "error_e3nn_D": 1e-15, "error_featomic_D": 1.2}]))
    basis     irrep  rotation  |D - D_e3nn|  |D - D_featomic|
    e3nn      1o     proper         1.0e-15           1.2e+00
    """
    lines = [f"{'basis':<9} {'irrep':<6} {'rotation':<9} {'|D - D_e3nn|':>12}  {'|D - D_featomic|':>16}"]
    for r in rows:
        lines.append(
            f"{r['basis']:<9} {r['irrep']:<6} {r['rotation']:<9} "
            f"{r['error_e3nn_D']:>12.1e}  {r['error_featomic_D']:>16.1e}"
        )
    return "\n".join(lines)


def plot_conventions(matrices, irreps, output) -> None:
    """Draw, per l (one row each), the matrix measured in featomic's basis, the one
    measured in e3nn's basis and e3nn's ``D_from_matrix``, for one proper rotation.

    ``matrices`` maps ``("featomic" | "e3nn" | "expected", irrep)`` to the matrices,
    as :py:func:`check_conventions` measures them; ``output`` is the PNG's path.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            'the picture needs matplotlib (pip install matplotlib, or "rascaline-e3nn[check]")'
        ) from None

    seen = set()
    irreps_by_l = []
    for _, ir in irreps:
        if ir.l not in seen:
            seen.add(ir.l)
            irreps_by_l.append(str(ir))

    columns = [
        ("featomic", "measured, basis=\"featomic\""),
        ("e3nn", "measured, basis=\"e3nn\""),
        ("expected", "e3nn Irrep.D_from_matrix(R)"),
    ]
    n = len(irreps_by_l)
    figure, axes = plt.subplots(n, 3, figsize=(11, 3.2 * n + 0.8), squeeze=False)
    for row, name in enumerate(irreps_by_l):
        ir = o3.Irrep(name)
        ticks = list(range(ir.dim))
        labels = [str(m) for m in range(-ir.l, ir.l + 1)]
        for column, (key, title) in enumerate(columns):
            ax = axes[row][column]
            D = matrices[(key, name)].detach().cpu().numpy()
            image = ax.imshow(D, cmap="RdBu_r", vmin=-1, vmax=1)
            if ir.dim <= 7:
                for (i, j), value in _entries(D):
                    if abs(value) >= 0.005:
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center",
                                fontsize=9 if ir.dim <= 5 else 7,
                                color="white" if abs(value) > 0.6 else "black")
            if key == "expected":
                subtitle = f"{name} (l={ir.l})\n"
            else:
                expected = matrices[("expected", name)]
                C = change_of_basis(ir.l, expected.dtype)
                e3nn_error = (matrices[(key, name)] - expected).abs().max()
                featomic_error = (matrices[(key, name)] - C.T @ expected @ C).abs().max()
                subtitle = (
                    f"{name}: max |D - D_e3nn| = {e3nn_error:.1e}\n"
                    f"max |D - D_featomic| = {featomic_error:.1e}"
                )
            ax.set_title(f"{title}\n{subtitle}", fontsize=9)
            if ir.l == 1:  # the components are the coordinates
                axis_labels = ["y", "z", "x"] if key == "featomic" else ["x", "y", "z"]
                axis_labels = [f"{m}: {c}" for m, c in zip(labels, axis_labels)]
            else:
                axis_labels = labels
            ax.set_xticks(ticks, axis_labels)
            ax.set_yticks(ticks, axis_labels)
            ax.set_xlabel("m (input)", fontsize=8)
            ax.set_ylabel("m (output)", fontsize=8)
            figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    figure.suptitle(
        "Wigner-D matrices of featomic output converted by TensorMapToIrreps, "
        "measured from a rotated structure\n(least squares: X_rotated ≈ X D^T over "
        "rows and channels; one random proper rotation R)",
        fontsize=11,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(str(output), dpi=100, pil_kwargs={"optimize": True})
    plt.close(figure)


def _entries(D):
    for i in range(D.shape[0]):
        for j in range(D.shape[1]):
            yield (i, j), float(D[i, j])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rascaline_e3nn.check",
        description="Measure the Wigner-D matrices of featomic output converted in "
        "both bases and compare them with e3nn's.",
    )
    parser.add_argument(
        "structure", nargs="?",
        help="a structure file ase can read (first frame); default: an embedded "
        "periodic box of two waters and a sodium ion",
    )
    parser.add_argument("--calculator", choices=CALCULATORS, default="lode")
    parser.add_argument(
        "--hypers",
        help="the calculator's hyper-parameters as JSON, or a JSON file "
        "(default: lmax 4, 3 radial functions)",
    )
    parser.add_argument("--rotations", type=int, default=2,
                        help="random proper rotations, each also used as -R (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="conventions.png",
                        help="PNG of the matrices (default conventions.png); '' for none")
    args = parser.parse_args(argv)

    hypers = None
    if args.hypers is not None:
        text = args.hypers
        try:
            if not text.lstrip().startswith("{"):
                text = pathlib.Path(text).read_text()
            hypers = json.loads(text)
        except (OSError, ValueError) as error:
            parser.error(f"--hypers: {error}")

    try:
        rows = check_conventions(
            args.structure, calculator=args.calculator, hypers=hypers,
            n_rotations=args.rotations, seed=args.seed, output=args.output or None,
        )
    except (ImportError, OSError, ValueError) as error:
        parser.error(str(error))
    print(format_table(rows))
    worst = max(r["error_e3nn_D"] for r in rows if r["basis"] == "e3nn")
    if args.output:
        print(f"wrote {args.output}")
    if worst > TOLERANCE:
        print(f"basis='e3nn' does not transform with e3nn's matrices: {worst:.1e}",
              file=sys.stderr)
        return 1
    print(f"basis='e3nn' transforms with e3nn's D_from_matrix (max error {worst:.1e}); "
          "basis='featomic' with featomic's own matrices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
