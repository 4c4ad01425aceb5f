"""Fixed cost per call and cost per block of both adapters, fitted as
``time = a + b * n_blocks`` (least squares) over real featomic output of 1 to 175
blocks.

The maps are featomic-torch ``SphericalExpansion`` outputs of one periodic box of
``--atoms`` atoms (cutoff 5 A in a box small enough that every atom sees every type,
so the blocks of one center type hold the same samples), with 1 to 5 atom types and
lmax 0 to 6: ``n_types**2 * (lmax + 1)`` blocks. The number of atoms, hence of rows,
is the same for every map, so ``b`` is the cost of a block's metadata plus its few
values, ``a`` what a call costs whatever the number of blocks.

Timed, for every map, with ``torch.utils.benchmark.Timer``: ``blocked_autorange``
measures in many short interleaved rounds (every variant once per round), each a
series of blocks of calls; the time per call of the fastest block is kept, the one
least disturbed by other work on a shared machine (a median is pulled up by every
interruption). The variants:

- ``TensorMapToIrreps`` forward (``TensorMapToIrreps.from_calculator``, default
  options), eager and ``torch.jit.script``-ed;
- ``IrrepsToTensorMap`` forward (``to_irreps.inverse()`` of the same layout, on the
  forward's output and samples), eager and scripted;
- the premise of the modules' design, that reading metatensor objects is much
  cheaper from TorchScript than from Python: a loop reading, for every block,
  ``tensor.block_by_id(i)``, then ``block.values``, ``block.samples.values``,
  ``block.components[0].values`` and ``block.properties.values`` (8 accesses to
  metatensor objects), run as Python and as a ``torch.jit.script`` function;
- the metadata step of ``TensorMapToIrreps`` itself (a private class the module
  compiles with TorchScript at construction), run as compiled and, for comparison,
  as plain Python (skipped with a message if the private class changes).

The fitted ``b`` of each Python (eager) variant is printed beside the TorchScript one
as a ratio, its ``a`` as a difference.

    python benchmarks/bench_fixed_cost.py                 # 1 thread, ~2 minutes
    python benchmarks/bench_fixed_cost.py --quick         # 3 small maps, seconds
"""

import argparse
import os
import platform
import warnings
from typing import Callable, Dict, List, Tuple

import torch
from torch.utils.benchmark import Timer

import e3nn
import featomic.torch as ft
import metatensor.torch as mts
from metatensor.torch import TensorMap
from metatomic.torch import System

from rascaline_e3nn import TensorMapToIrreps

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

TYPES = [1, 6, 7, 8, 9]
#: (number of atom types, lmax): n_types**2 * (lmax + 1) blocks, from 1 to 175
FULL = [(1, 0), (1, 3), (2, 1), (2, 3), (3, 2), (2, 6), (3, 4), (3, 6), (4, 4), (5, 3), (4, 6), (5, 6)]
QUICK = [(1, 0), (2, 1), (3, 1)]


# ---------------------------------------------------------------------- inputs


def box(n_atoms: int, n_types: int, seed: int = 0) -> System:
    """A periodic cubic box (side 6 A) of random atoms at least 1.2 A apart, every
    one of the first ``n_types`` types present."""
    side = 6.0
    g = torch.Generator().manual_seed(seed)
    positions: List[torch.Tensor] = []
    while len(positions) < n_atoms:
        p = torch.rand(3, generator=g, dtype=torch.float64) * side
        d = [((p - q + side / 2) % side - side / 2).norm() for q in positions]
        if all(x > 1.2 for x in d):
            positions.append(p)
    types = torch.tensor([TYPES[i % n_types] for i in range(n_atoms)], dtype=torch.int32)
    return System(
        types=types,
        positions=torch.stack(positions),
        cell=torch.eye(3, dtype=torch.float64) * side,
        pbc=torch.tensor([True, True, True]),
    )


def calculator(lmax: int, n_radial: int):
    return ft.SphericalExpansion(
        cutoff={"radius": 5.0, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
        density={"type": "Gaussian", "width": 0.3},
        basis={
            "type": "TensorProduct",
            "max_angular": lmax,
            "radial": {"type": "Gto", "max_radial": n_radial - 1},
        },
    )


# ------------------------------------------------------------------ variants


def read_attributes(tensor: TensorMap) -> int:
    """Per block: its values, samples, components and properties (what a metadata
    step reads), one attribute access each."""
    total = 0
    for i in range(len(tensor.keys)):
        block = tensor.block_by_id(i)
        total += block.values.shape[0]
        total += block.samples.values.shape[0]
        total += block.components[0].values.shape[0]
        total += block.properties.values.shape[0]
    return total


read_attributes_scripted = torch.jit.script(read_attributes)


def python_metadata_step(to_irreps: TensorMapToIrreps):
    """The module's metadata step as plain Python (None if the private class it is
    built from has changed)."""
    try:
        from rascaline_e3nn._to_irreps import _ReadTensorMap

        read = _ReadTensorMap(
            to_irreps.plan,
            to_irreps.plan.column_map(to_irreps.basis, to_irreps.layout),
            to_irreps.basis == "e3nn",
            to_irreps.check,
        )
        return read.read
    except Exception as error:  # noqa: BLE001 - a benchmark of a private class
        print(f"(the Python metadata step is skipped: {type(error).__name__}: {error})")
        return None


def variants(tensor: TensorMap, lmax: int, n_radial: int) -> Dict[str, Callable[[], object]]:
    to_irreps = TensorMapToIrreps.from_calculator(
        calculator(lmax, n_radial), sorted({int(k) for k in tensor.keys.column("center_type")})
    )
    scripted = torch.jit.script(to_irreps)
    inverse = to_irreps.inverse()
    inverse_scripted = torch.jit.script(inverse)
    x, samples = to_irreps.forward_with_samples(tensor)
    assert torch.equal(scripted(tensor), x)
    assert mts.equal(inverse_scripted(x, samples), inverse(x, samples))
    found = {
        "to_irreps eager": lambda: to_irreps(tensor),
        "to_irreps scripted": lambda: scripted(tensor),
        "inverse eager": lambda: inverse(x, samples),
        "inverse scripted": lambda: inverse_scripted(x, samples),
        "read attributes, Python": lambda: read_attributes(tensor),
        "read attributes, TorchScript": lambda: read_attributes_scripted(tensor),
        "metadata step, TorchScript": lambda: to_irreps._read.read(tensor, None, True),
    }
    step = python_metadata_step(to_irreps)
    if step is not None:
        expected = to_irreps._read.read(tensor, None, True)
        got = step(tensor, None, True)
        assert all(torch.equal(a, b) for a, b in zip(expected[0] + [expected[2]], got[0] + [got[2]]))
        found["metadata step, Python"] = lambda: step(tensor, None, True)
    return found


# ------------------------------------------------------------------ fitting


def fit(n: List[int], t: List[float]) -> Tuple[float, float, List[float]]:
    """Least squares ``t = a + b * n``: ``(a, b, residuals)``."""
    A = torch.tensor([[1.0, float(k)] for k in n], dtype=torch.float64)
    y = torch.tensor(t, dtype=torch.float64).reshape(-1, 1)
    solution = torch.linalg.lstsq(A, y).solution.reshape(-1)
    a, b = float(solution[0]), float(solution[1])
    return a, b, [ti - (a + b * k) for k, ti in zip(n, t)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--atoms", type=int, default=20, help="atoms in the box (default 20)")
    parser.add_argument("--radial", type=int, default=4, help="radial functions (default 4)")
    parser.add_argument("--min-time", type=float, default=0.05,
                        help="seconds of blocked_autorange per measure (default 0.05)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--quick", action="store_true",
                        help="3 small maps, short measures: checks that the script runs")
    args = parser.parse_args()
    configurations = QUICK if args.quick else FULL
    if args.quick:
        args.min_time, args.rounds, args.atoms = 0.01, 1, min(args.atoms, 8)
    torch.set_num_threads(args.threads)

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}")
    print(
        f"torch {torch.__version__}, featomic-torch {ft.__version__}, metatensor-torch "
        f"{mts.__version__}, e3nn {e3nn.__version__}, python {platform.python_version()}"
    )
    print(
        f"settings: threads {args.threads}, {args.atoms} atoms, {args.radial} radial functions, "
        f"min-time {args.min_time} s per measure in {args.rounds} interleaved rounds"
        + (", --quick" if args.quick else "")
    )
    print("maps (n_types, lmax):", configurations)

    n_blocks: List[int] = []
    cases = []
    for n_types, lmax in configurations:
        tensor = calculator(lmax, args.radial)([box(args.atoms, n_types)])
        n_blocks.append(len(tensor.keys))
        cases.append(variants(tensor, lmax, args.radial))
    names = list(cases[0])
    times: Dict[str, List[List[float]]] = {name: [[] for _ in cases] for name in names}
    for _ in range(args.rounds):
        for c, case in enumerate(cases):
            for name in names:
                if name not in case:
                    continue
                timer = Timer("f()", globals={"f": case[name]}, num_threads=args.threads)
                times[name][c].extend(timer.blocked_autorange(min_run_time=args.min_time).times)
    fastest = {
        name: [min(t) * 1e6 for t in times[name]]
        for name in names if all(len(t) > 0 for t in times[name])
    }

    width = max(len(name) for name in fastest)
    print("\ntime per call (us), fastest block of calls over all rounds; columns: blocks")
    print(f"{'':<{width}} " + " ".join(f"{n:>7}" for n in n_blocks))
    for name, t in fastest.items():
        print(f"{name:<{width}} " + " ".join(f"{x:>7.1f}" for x in t))

    print("\nfit time = a + b * n_blocks (least squares); residuals (us) by map, as above:")
    print(f"{'':<{width}} {'a (us)':>7} {'b (us/block)':>12} {'max |res|':>9}  residuals")
    fits = {}
    for name, t in fastest.items():
        a, b, residuals = fit(n_blocks, t)
        fits[name] = (a, b)
        print(
            f"{name:<{width}} {a:>7.1f} {b:>12.2f} {max(abs(r) for r in residuals):>9.1f}  "
            + " ".join(f"{r:+.0f}" for r in residuals)
        )

    print("\nPython against TorchScript: b as a ratio, a as a difference")
    for eager, scripted in (
        ("to_irreps eager", "to_irreps scripted"),
        ("inverse eager", "inverse scripted"),
        ("read attributes, Python", "read attributes, TorchScript"),
        ("metadata step, Python", "metadata step, TorchScript"),
    ):
        if eager in fits and scripted in fits:
            (ae, be), (as_, bs) = fits[eager], fits[scripted]
            print(
                f"{eager:<{width}} vs {scripted:<{width}}  b {be / bs:5.2f}x  "
                f"a {ae - as_:+7.1f} us"
            )


if __name__ == "__main__":
    main()
