"""``rascaline_e3nn.LodeSphericalExpansion`` against featomic-torch's, on the CPU.

Rock-salt Na/Cl boxes of 4^3 to 16^3 atoms (lattice 2.82 A, atoms displaced by 0.1 A
at random), float64, smearing 1 A, lmax 4, 4 radial functions, featomic's default k
cutoff. For each size: the forward (positions not requiring grad) and the forward +
backward to the positions (a scalar loss on every block), this module beside
featomic, in one run, with the ratio. featomic's backward costs O(N^3) (its position
gradients are a dense (atom, atom) array summed over every k-vector), so its forward
+ backward is timed up to ``--featomic-backward-max`` atoms only; its forward up to
``--featomic-max``. The peak memory of this module's forward and forward + backward,
default and ``low_memory=True``, is the growth of a fresh process's peak resident set
(Linux's ``VmHWM``, reset before the call) over its resident set before the call, with
glibc's default malloc and with a fixed mmap threshold (the live tensors' peak). ``--plot`` draws time against atoms, log-log.

    python benchmarks/bench_lode.py --plot docs/lode_scaling.png
    python benchmarks/bench_lode.py --sides 4 6 --memory-sides 4   # a quick look
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings

THREADS = "1"
for i, arg in enumerate(sys.argv):
    if arg == "--threads" and i + 1 < len(sys.argv):
        THREADS = sys.argv[i + 1]
# featomic's thread pool reads this when it starts
os.environ.setdefault("RAYON_NUM_THREADS", THREADS)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from metatomic.torch import System  # noqa: E402

warnings.filterwarnings("ignore")

HYPERS = {
    "density": {"type": "SmearedPowerLaw", "smearing": 1.0, "exponent": 1},
    "basis": {"type": "TensorProduct", "max_angular": 4,
              "radial": {"type": "Gto", "max_radial": 3, "radius": 3.0}},
}


def rock_salt(side: int, seed: int = 0, requires_grad: bool = False) -> System:
    """``side**3`` atoms of rock salt, displaced at random by 0.1 A."""
    rng = np.random.default_rng(seed)
    a = 2.82
    index = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    positions = index * a + rng.normal(scale=0.1, size=index.shape)
    types = np.where(index.sum(axis=1) % 2 == 0, 11, 17)
    return System(
        types=torch.tensor(types, dtype=torch.int32),
        positions=torch.tensor(positions).requires_grad_(requires_grad),
        cell=torch.eye(3, dtype=torch.float64) * a * side,
        pbc=torch.tensor([True, True, True]),
    )


def timed(function, repeats: int, budget: float) -> float:
    """Median of up to ``repeats`` calls after a warm-up, fewer when the calls exceed
    ``budget`` s (a warm-up longer than a quarter of it is the one measurement)."""
    start = time.perf_counter()
    function()  # warm-up
    first = time.perf_counter() - start
    if first > budget / 4:
        return first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
        if sum(times) > budget:
            break
    return float(np.median(times))


def forward(calculator, side):
    system = rock_salt(side)
    return lambda: calculator([system])


def forward_backward(calculator, side):
    def run():
        system = rock_salt(side, requires_grad=True)
        tensor = calculator([system])
        loss = sum((block.values ** 2).sum() for block in tensor.blocks())
        loss.backward()

    return run


MEMORY_CHILD = """
import sys, torch
sys.path.insert(0, {here!r})
from bench_lode import HYPERS, rock_salt
from rascaline_e3nn import LodeSphericalExpansion

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

torch.set_num_threads({threads})
calculator = LodeSphericalExpansion(**HYPERS, low_memory={low_memory})
system = rock_salt({side}, requires_grad={backward})
calculator([rock_salt(2)])
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak resident set (VmHWM) to the current one
tensor = calculator([system])
if {backward}:
    sum((b.values ** 2).sum() for b in tensor.blocks()).backward()
print((status("VmHWM:") - before) / 1024)
"""


def peak_memory_mb(side: int, backward: bool, low_memory: bool, threads: int,
                   fixed_mmap_threshold: bool = False) -> float:
    """Peak memory of one call in a fresh process. glibc's malloc raises its mmap
    threshold as large blocks are freed, after which freed chunks stay in the heap, so
    the resident set can stay above what the live tensors need;
    ``fixed_mmap_threshold`` (``MALLOC_MMAP_THRESHOLD_=65536``) gives large blocks back
    to the system when freed, so that the peak is that of the live tensors."""
    code = MEMORY_CHILD.format(
        here=os.path.dirname(os.path.abspath(__file__)), side=side, backward=backward,
        low_memory=low_memory, threads=threads,
    )
    env = dict(os.environ)
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env=env)
    return float(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="*", default=[4, 6, 8, 10, 13, 16],
                        help="boxes of side**3 atoms (default: 64 to 4096 atoms)")
    parser.add_argument("--featomic-max", type=int, default=1000,
                        help="featomic's forward up to this many atoms")
    parser.add_argument("--featomic-backward-max", type=int, default=512,
                        help="featomic's forward + backward up to this many atoms")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of repeated calls per measurement at most")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's threads and featomic's (RAYON_NUM_THREADS)")
    parser.add_argument("--memory-sides", type=int, nargs="*", default=[10, 16],
                        help="peak memory at these sizes (default: 1000 and 4096 atoms)")
    parser.add_argument("--plot", default=None, help="write a log-log plot here (PNG)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    import featomic.torch as ft

    from rascaline_e3nn import LodeSphericalExpansion

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s) (featomic: RAYON_NUM_THREADS="
          f"{os.environ['RAYON_NUM_THREADS']}), {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print(f"hypers: {json.dumps(HYPERS)}")
    ours = LodeSphericalExpansion(**HYPERS)
    featomic = ft.LodeSphericalExpansion(**HYPERS)

    rows = []
    header = (f"{'atoms':>6} {'k-vectors':>9} | {'forward':>9} {'featomic':>9} {'ratio':>6} | "
              f"{'fwd+bwd':>9} {'featomic':>9} {'ratio':>7}")
    print(header)
    print("-" * len(header))
    for side in args.sides:
        n = side ** 3
        from rascaline_e3nn._lode import k_vectors

        _, mask = k_vectors(rock_salt(side).cell[None], ours.k_cutoff)
        row = {"atoms": n, "k_vectors": int(mask.sum())}
        row["forward"] = timed(forward(ours, side), args.repeats, args.budget)
        row["forward_backward"] = timed(forward_backward(ours, side), args.repeats, args.budget)
        if n <= args.featomic_max:
            row["featomic_forward"] = timed(forward(featomic, side), args.repeats, args.budget)
        if n <= args.featomic_backward_max:
            row["featomic_forward_backward"] = timed(
                forward_backward(featomic, side), args.repeats, args.budget
            )
        rows.append(row)

        def show(key):
            return f"{row[key]:9.4f}" if key in row else f"{'-':>9}"

        def ratio(key, width):
            if f"featomic_{key}" not in row:
                return f"{'-':>{width}}"
            return f"{row[f'featomic_{key}'] / row[key]:{width}.1f}x"[: width + 1]

        print(f"{n:6d} {row['k_vectors']:9d} | {show('forward')} {show('featomic_forward')} "
              f"{ratio('forward', 5)} | {show('forward_backward')} "
              f"{show('featomic_forward_backward')} {ratio('forward_backward', 6)}", flush=True)
    print("times in seconds (median); ratio = featomic / this module")

    memory = []
    if args.memory_sides:
        print("\npeak memory of this module (peak resident set over the one before the call, MB;")
        print("glibc's default malloc | with MALLOC_MMAP_THRESHOLD_=65536, the live tensors):")
        print(f"{'atoms':>6} | {'forward':>15} | {'fwd+bwd':>15} | {'low_memory fwd+bwd':>18}")
        for side in args.memory_sides:
            entry = {"atoms": side ** 3}
            for name, backward, low in [("forward", False, False),
                                        ("forward_backward", True, False),
                                        ("low_memory_forward_backward", True, True)]:
                for fixed in [False, True]:
                    key = name + ("_fixed_mmap_threshold" if fixed else "")
                    entry[key] = peak_memory_mb(side, backward, low, args.threads, fixed)
            memory.append(entry)

            def pair(name):
                return f"{entry[name]:6.0f} | {entry[name + '_fixed_mmap_threshold']:6.0f}"

            print(f"{entry['atoms']:6d} | {pair('forward'):>15} | {pair('forward_backward'):>15} | "
                  f"{pair('low_memory_forward_backward'):>18}", flush=True)

    if args.json:
        with open(args.json, "w") as file:
            json.dump({"times": rows, "memory": memory, "threads": args.threads}, file, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.2))
        for key, label, style in [
            ("forward", "rascaline_e3nn forward", "o-C0"),
            ("forward_backward", "rascaline_e3nn forward + backward", "s-C0"),
            ("featomic_forward", "featomic forward", "o--C3"),
            ("featomic_forward_backward", "featomic forward + backward", "s--C3"),
        ]:
            points = [(r["atoms"], r[key]) for r in rows if key in r]
            if points:
                x, y = zip(*points)
                ax.loglog(x, y, style, label=label, markerfacecolor="none" if "forward_b" not in key else None)
        ax.set_xlabel("atoms (one rock-salt box)")
        ax.set_ylabel("time (s)")
        ax.set_title(f"LODE, lmax 4, 4 radial functions, float64, {args.threads} CPU thread(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
