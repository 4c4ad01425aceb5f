"""Cost of ``TensorMapToIrreps`` next to the featomic calculator feeding it and a
training step around both, on real featomic output (float64).

Cases: "small SOAP" (``SphericalExpansion`` of 8 periodic boxes of 64 Na/Cl/O atoms,
cutoff 4 A, lmax 4, 4 radial functions: 45 blocks) and "LODE"
(``LodeSphericalExpansion`` of 4 boxes of 32 Na/Cl atoms, lmax 3, 3 radial functions).
Each time is a median of ``torch.utils.benchmark.Timer.blocked_autorange`` blocks, in
interleaved rounds (every variant once per round, the median over the rounds), so
that drifts of a shared machine affect all alike; every number is printed beside its
baseline (featomic's forward, or the training step) as a share. The training step is featomic's forward (positions requiring grad),
the adapter, ``o3.Linear`` to 8x0e+8x1o, a ``FullyConnectedTensorProduct`` of that
with itself to 4x0e, a per-system sum, and the backward of a scalar loss to the
positions and the weights.

    python benchmarks/bench_adapters.py                   # both cases, 1 thread
    python benchmarks/bench_adapters.py --threads 2 --min-time 1.5 --rounds 5
"""

import argparse
import os
import platform
import statistics
import warnings
from typing import Callable, Dict, List

import torch
from torch.utils.benchmark import Timer

import e3nn
import featomic.torch as ft
import metatensor.torch as mts
from e3nn import o3
from metatensor.torch import TensorBlock, TensorMap
from metatomic.torch import System

from rascaline_e3nn import TensorMapToIrreps

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

VIEW_OPS = {
    "view", "reshape", "narrow", "slice", "select", "as_strided", "transpose",
    "permute", "expand", "unsqueeze", "squeeze", "t", "alias", "_unsafe_view", "detach",
    "movedim", "split", "split_with_sizes", "unbind", "lift_fresh", "contiguous",
    "expand_as", "flatten", "_reshape_alias", "unflatten",
}


# ---------------------------------------------------------------------- inputs


def boxes(n_boxes: int, n_atoms: int, types: List[int], side: float, seed: int):
    """Periodic cubic boxes of random atoms at least 1.6 A apart."""
    g = torch.Generator().manual_seed(seed)
    systems = []
    for _ in range(n_boxes):
        positions: List[torch.Tensor] = []
        while len(positions) < n_atoms:
            p = torch.rand(3, generator=g, dtype=torch.float64) * side
            d = [((p - q + side / 2) % side - side / 2).norm() for q in positions]
            if all(x > 1.6 for x in d):
                positions.append(p)
        atom_types = torch.tensor(types)[torch.randint(len(types), (n_atoms,), generator=g)]
        atom_types[: len(types)] = torch.tensor(types)
        systems.append(
            System(
                types=atom_types,
                positions=torch.stack(positions),
                cell=torch.eye(3, dtype=torch.float64) * side,
                pbc=torch.tensor([True, True, True]),
            )
        )
    return systems


def soap_case():
    calculator = ft.SphericalExpansion(
        cutoff={"radius": 4.0, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
        density={"type": "Gaussian", "width": 0.3},
        basis={"type": "TensorProduct", "max_angular": 4,
               "radial": {"type": "Gto", "max_radial": 3}},
    )
    types = [8, 11, 17]
    return calculator, types, boxes(8, 64, types, side=10.0, seed=0)


def lode_case():
    calculator = ft.LodeSphericalExpansion(
        density={"type": "SmearedPowerLaw", "smearing": 1.0, "exponent": 1},
        basis={"type": "TensorProduct", "max_angular": 3,
               "radial": {"type": "Gto", "max_radial": 2, "radius": 3.0}},
    )
    types = [11, 17]
    return calculator, types, boxes(4, 32, types, side=8.0, seed=1)


def with_grad(tensor: TensorMap) -> TensorMap:
    """The same TensorMap, its values detached leaves requiring grad."""
    blocks = [
        TensorBlock(b.values.detach().clone().requires_grad_(True), b.samples,
                    b.components, b.properties)
        for b in tensor.blocks()
    ]
    return TensorMap(tensor.keys, blocks)


# ---------------------------------------------------------------------- measures


def measure(calls: Dict[str, Callable[[], object]], threads: int, min_time: float,
            rounds: int) -> Dict[str, float]:
    """Median seconds of one call of each function: in each round every function is
    timed once (``min_time / rounds`` seconds), so that slow drifts of the machine
    affect all alike; the result is the median over the rounds."""
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(rounds):
        for name, fn in calls.items():
            timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
            times[name].append(timer.blocked_autorange(min_run_time=min_time / rounds).median)
    return {name: statistics.median(t) for name, t in times.items()}


def count_ops(fn: Callable[[], object]) -> int:
    """Top-level aten operators of one call, views excluded (the copy a ``reshape``
    or ``contiguous`` makes when it cannot be a view is counted)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    n = 0
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name[len("aten::"):] in VIEW_OPS:
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name[len("aten::"):] in VIEW_OPS:
            parent = parent.cpu_parent
        if parent is None or not parent.name.startswith("aten::"):
            n += 1
    return n


def adapter_calls(name: str, module, tensor: TensorMap) -> Dict[str, Callable[[], object]]:
    """Forward (no grad) and forward+backward of ``module`` on ``tensor``."""
    leaves = with_grad(tensor)
    inputs = [b.values for b in leaves.blocks()]
    grad_out = torch.randn_like(module(tensor))

    def forward():
        with torch.no_grad():
            return module(tensor)

    def forward_backward():
        out = module(leaves)
        return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)

    return {name: forward, name + "_fb": forward_backward}


class Head(torch.nn.Module):
    """A small e3nn block: Linear, then a tensor product to scalars."""

    def __init__(self, irreps_in):
        super().__init__()
        hidden = o3.Irreps("8x0e+8x1o")
        self.linear = o3.Linear(irreps_in, hidden)
        self.product = o3.FullyConnectedTensorProduct(hidden, hidden, "4x0e")

    def forward(self, x):
        h = self.linear(x)
        return self.product(h, h).sum(-1)


def training_step(calculator, systems, adapter, head) -> Callable[[], object]:
    positions = [s.positions.detach().clone().requires_grad_(True) for s in systems]
    batch = [
        System(types=s.types, positions=p, cell=s.cell, pbc=s.pbc)
        for s, p in zip(systems, positions)
    ]
    weights = list(head.parameters())

    def step():
        features = adapter(calculator(batch))
        loss = head(features).square().sum()
        return torch.autograd.grad(loss, positions + weights)

    return step


def share(x: float, base: float) -> str:
    return f"{100 * x / base:6.1f} %"


def run_case(name, make, args) -> Dict[str, float]:
    calculator, types, systems = make()
    with torch.no_grad():
        tensor = calculator(systems)
    n_rows = sum(len(s) for s in systems)
    adapter = TensorMapToIrreps.from_calculator(calculator, types)
    scripted = torch.jit.script(adapter)
    out = adapter(tensor)
    assert torch.equal(out, scripted(tensor))
    print(f"\n## {name}: {len(tensor.keys)} blocks, {n_rows} atoms, "
          f"{sum(b.values.numel() for b in tensor.blocks()) * 8 / 1e6:.1f} MB float64 "
          f"-> [{out.shape[0]}, {out.shape[1]}] ({adapter.irreps_out})")

    ops = count_ops(lambda: adapter(tensor))

    def featomic_forward():
        with torch.no_grad():
            return calculator(systems)

    torch.manual_seed(0)
    head = Head(adapter.irreps_out).to(torch.float64)
    calls = {"featomic": featomic_forward}
    calls.update(adapter_calls("eager", adapter, tensor))
    calls.update(adapter_calls("script", scripted, tensor))
    calls["step"] = training_step(calculator, systems, adapter, head)
    t = measure(calls, args.threads, args.min_time, args.rounds)

    ms = lambda x: f"{1e3 * x:8.3f} ms"  # noqa: E731
    base = t["featomic"]
    print(f"top-level aten ops of one forward (views excluded): {ops}")
    print(f"{'':37s}{'time':>11s}  {'share of featomic forward':>26s}")
    print(f"{'featomic forward':37s}{ms(base)}  {share(base, base):>26s}")
    rows = [("eager", "adapter eager"), ("script", "adapter scripted")]
    for key, label in rows:
        print(f"{label + ' forward':37s}{ms(t[key])}  {share(t[key], base):>26s}")
        print(f"{label + ' forward+backward':37s}{ms(t[key + '_fb'])}  "
              f"{share(t[key + '_fb'], base):>26s}")
    step = t["step"]
    print(f"{'training step (eager adapter)':37s}{ms(step)}  "
          f"{share(step, base):>26s}")
    print(f"adapter forward+backward = {share(t['eager_fb'], step).strip()} of the "
          f"training step (scripted: {share(t['script_fb'], step).strip()})")
    return t


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--min-time", type=float, default=0.6,
                        help="seconds of timing per measure, all rounds (0.6)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds, median over them (3)")
    parser.add_argument("--cases", nargs="+", default=["soap", "lode"],
                        choices=["soap", "lode"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} cores, {platform.system()} "
          f"{platform.release()}")
    print(f"torch {torch.__version__}, featomic-torch {ft.__version__}, "
          f"metatensor-torch {mts.__version__}, e3nn {e3nn.__version__}, python "
          f"{platform.python_version()}")
    print(f"settings: threads {args.threads}, min-time {args.min_time} s per measure in "
          f"{args.rounds} interleaved rounds, "
          f"cases {args.cases}")

    cases = {"soap": ("small SOAP", soap_case), "lode": ("LODE", lode_case)}
    for case in args.cases:
        name, make = cases[case]
        run_case(name, make, args)


if __name__ == "__main__":
    main()
