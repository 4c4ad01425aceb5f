"""Benchmark of ``TensorMapToIrreps`` / ``IrrepsToTensorMap`` against a ``torch.clone``
of the same bytes and against the metatensor chain a user would write by hand.

Every time is the median of ``torch.utils.benchmark.Timer.blocked_autorange`` blocks;
the variants are measured in interleaved rounds (round 1: every variant, round 2: every
variant, ...) so that slow drifts of the machine affect all of them alike.

Reference case (default): 16 systems x 125 atoms, 3 atom types, lmax 6, 8 radial
functions: 63 blocks, 9.4 MB of float32 values, featomic's exact metadata.

    python benchmarks/bench_adapters.py                   # reference table, targets, memory, host reads
    python benchmarks/bench_adapters.py --threads 2       # the same with 2 torch threads
    python benchmarks/bench_adapters.py --check-overhead  # cost of check=True
    python benchmarks/bench_adapters.py --page-cost       # first-touch cost of fresh memory pages
    python benchmarks/bench_adapters.py --bandwidth       # the clone in cache vs copies out of cache
    python benchmarks/bench_adapters.py --prefetch        # the fused kernel's prefetching on / off
    python benchmarks/bench_adapters.py --isa             # its row loops for baseline x86-64 / AVX2
    python benchmarks/bench_adapters.py --stores          # non-temporal stores always / for large outputs / never
    python benchmarks/bench_adapters.py --sweep           # size / lmax sweep -> sweep.json
    python benchmarks/plot.py                             # sweep.json -> scaling.png
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.benchmark import Timer

import e3nn
import featomic.torch
import metatensor.torch as mts
from e3nn import o3
from metatensor.torch import Labels, TensorBlock, TensorMap

import rascaline_e3nn
from rascaline_e3nn import TensorMapToIrreps, _fused

warnings.filterwarnings("ignore", message=".*TorchScript.*")
warnings.filterwarnings("ignore", message=".*torch.jit.*")
warnings.filterwarnings("ignore", category=FutureWarning)

HERE = os.path.dirname(os.path.abspath(__file__))
KEY_NAMES = ["o3_lambda", "o3_sigma", "center_type", "neighbor_type"]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: the fused kernel, built (or loaded from the cache) now
KERNEL = rascaline_e3nn.library_path()


# ---------------------------------------------------------------------- machine


def machine() -> Dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical cpus": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "metatensor-torch": mts.__version__,
        "featomic-torch": featomic.torch.__version__,
        "e3nn": e3nn.__version__,
        "rascaline_e3nn": rascaline_e3nn.__version__,
        "fused kernel": KERNEL,
        "fused row loops": _fused.isa(),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg())
        + " (1, 5, 15 min)",
        "glibc malloc env": " ".join(
            f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")
        ) or "(defaults)",
        "gpu": (
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (unmeasured)"
        ),
    }


# ---------------------------------------------------------------------- data


def featomic_like(
    n_systems: int,
    n_atoms: int,
    lmax: int,
    n_radial: int,
    types: Sequence[int] = (1, 6, 8),
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    seed: int = 0,
) -> TensorMap:
    """A spherical expansion with featomic's exact metadata and random values.

    Keys ``(o3_lambda, o3_sigma, center_type, neighbor_type)`` in featomic's order
    (center, neighbor, then lambda fastest), int32 Labels, samples ``(system, atom)``
    of the atoms of each center type, components ``o3_mu``, properties ``n``. Every
    system contains every type, so every (center, neighbor) pair has a block and the
    blocks of a center type share their samples, as featomic gives for such a batch.
    """
    g = torch.Generator().manual_seed(seed)
    types_t = torch.tensor(sorted(types), dtype=torch.int32)
    if n_atoms < len(types):
        raise ValueError("need at least one atom of every type per system")
    systems = []
    for _ in range(n_systems):
        a = types_t[torch.randint(len(types), (n_atoms,), generator=g)]
        a[: len(types)] = types_t
        systems.append(a)
    samples = {}
    for c in types_t.tolist():
        rows = []
        for s, a in enumerate(systems):
            atoms = torch.nonzero(a == c)[:, 0].to(torch.int32)
            rows.append(torch.stack([torch.full_like(atoms, s), atoms], dim=1))
        samples[c] = Labels(["system", "atom"], torch.cat(rows))
    props = Labels(["n"], torch.arange(n_radial, dtype=torch.int32).reshape(-1, 1))
    comps = [
        Labels(["o3_mu"], torch.arange(-l, l + 1, dtype=torch.int32).reshape(-1, 1))
        for l in range(lmax + 1)
    ]
    keys: List[List[int]] = []
    blocks: List[TensorBlock] = []
    for c in types_t.tolist():
        for nt in types_t.tolist():
            for l in range(lmax + 1):
                s = samples[c]
                v = torch.randn(len(s), 2 * l + 1, n_radial, generator=g, dtype=torch.float64)
                v = v.to(dtype).requires_grad_(requires_grad)
                keys.append([l, 1, c, nt])
                blocks.append(TensorBlock(v, s, [comps[l]], props))
    return TensorMap(Labels(KEY_NAMES, torch.tensor(keys, dtype=torch.int32)), blocks)


def nbytes(tensor: TensorMap) -> int:
    return sum(b.values.numel() * b.values.element_size() for b in tensor.blocks())


def leaves(tensor: TensorMap) -> List[torch.Tensor]:
    return [b.values for b in tensor.blocks()]


# ---------------------------------------------------------------------- the chain


def e3nn_basis_change(lmax: int, dtype: torch.dtype) -> List[torch.Tensor]:
    """``x_e3nn = D_l @ x_featomic``, computed directly from e3nn (independently of the
    package): D = Irrep(l, 1).D_from_matrix(Q) in float64, Q = [[0,0,1],[1,0,0],[0,1,0]]."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        Q = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        return [o3.Irrep(l, 1).D_from_matrix(Q).to(dtype) for l in range(lmax + 1)]
    finally:
        torch.set_default_dtype(default)


def chain_to_irreps(
    tensor: TensorMap, layout: str, D: Optional[List[torch.Tensor]]
) -> Tuple[torch.Tensor, Labels]:
    """What a user writes without the adapter: move ``center_type`` to samples and
    ``neighbor_type`` to properties with metatensor, then flatten every lambda block
    (sorted by e3nn's (l, p) order) and concatenate. ``D`` (per l) rotates to e3nn's
    basis; ``None`` keeps featomic's."""
    merged = tensor.keys_to_samples("center_type").keys_to_properties("neighbor_type")
    keys = merged.keys.values.tolist()
    # e3nn order: l, then parity p = sigma * (-1)^l, with p = -1 first
    order = sorted(range(len(keys)), key=lambda i: (keys[i][0], keys[i][1] * (-1) ** keys[i][0]))
    parts = []
    samples = merged.block_by_id(order[0]).samples
    for i in order:
        l = keys[i][0]
        v = merged.block_by_id(i).values  # [n, 2l+1, n_neighbor_types * n_radial]
        n = v.shape[0]
        if D is not None:
            v = torch.matmul(D[l], v)
        if layout == "mul_ir":
            parts.append(v.transpose(1, 2).reshape(n, -1))
        else:
            parts.append(v.reshape(n, -1))
    return torch.cat(parts, dim=1), samples


class ChainInverse:
    """The hand-written inverse: split the flat tensor per lambda into
    ``[n, 2l+1, neighbor x n]`` blocks keyed (o3_lambda, o3_sigma), then use
    ``metatensor.torch.split`` to send ``center_type`` (a sample dimension) and
    ``neighbor_type`` (a property dimension) back to the keys, in featomic's key order.
    The metadata needed (irreps, property Labels, types) is prepared once here."""

    def __init__(self, template: TensorMap, layout: str, D: Optional[List[torch.Tensor]]):
        self.layout = layout
        self.D = D
        merged = template.keys_to_samples("center_type").keys_to_properties("neighbor_type")
        keys = merged.keys.values.tolist()
        order = sorted(
            range(len(keys)), key=lambda i: (keys[i][0], keys[i][1] * (-1) ** keys[i][0])
        )
        self.irreps = []  # (l, sigma, properties (neighbor_type, n))
        for i in order:
            block = merged.block_by_id(i)
            self.irreps.append((keys[i][0], keys[i][1], block.properties, block.components))
        self.merged_keys = Labels(
            ["o3_lambda", "o3_sigma"], torch.tensor([[l, s] for l, s, _, _ in self.irreps])
        )
        self.out_keys = template.keys
        tk = template.keys.values
        self.centers = sorted(set(tk[:, 2].tolist()))
        self.neighbors = sorted(set(tk[:, 3].tolist()))
        self.center_sel = [Labels(["center_type"], torch.tensor([[c]])) for c in self.centers]
        self.neighbor_sel = [Labels(["neighbor_type"], torch.tensor([[n]])) for n in self.neighbors]

    def __call__(self, x: torch.Tensor, samples: Labels) -> TensorMap:
        n = x.shape[0]
        blocks = []
        start = 0
        for l, _, props, comps in self.irreps:
            width = len(props) * (2 * l + 1)
            seg = x[:, start : start + width]
            start += width
            if self.layout == "mul_ir":
                v = seg.reshape(n, len(props), 2 * l + 1).transpose(1, 2)
            else:
                v = seg.reshape(n, 2 * l + 1, len(props))
            if self.D is not None:
                v = torch.matmul(self.D[l].t(), v)
            blocks.append(TensorBlock(v, samples, comps, props))
        merged = TensorMap(self.merged_keys, blocks)
        by_key = {}
        for c, per_center in zip(
            self.centers, mts.split(merged, axis="samples", selections=self.center_sel)
        ):
            per_center = mts.remove_dimension(per_center, axis="samples", name="center_type")
            for nt, part in zip(
                self.neighbors,
                mts.split(per_center, axis="properties", selections=self.neighbor_sel),
            ):
                part = mts.remove_dimension(part, axis="properties", name="neighbor_type")
                for (l, s), block in zip(part.keys.values.tolist(), part.blocks()):
                    # a new block around the same values (a block viewed inside a
                    # TensorMap cannot be moved to another one)
                    by_key[(l, s, c, nt)] = TensorBlock(
                        block.values, block.samples, block.components, block.properties
                    )
        out_blocks = [by_key[tuple(k)] for k in self.out_keys.values.tolist()]
        return TensorMap(self.out_keys, out_blocks)


# ---------------------------------------------------------------------- checks


def verify(tensor: TensorMap, lmax: int) -> None:
    """The chain is a correct program: it gives exactly what the adapters give."""
    dtype = tensor.block(0).values.dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    for basis in ("featomic", "e3nn"):
        D = e3nn_basis_change(lmax, dtype) if basis == "e3nn" else None
        for layout in ("mul_ir", "ir_mul"):
            to_irreps = TensorMapToIrreps(tensor, basis=basis, layout=layout)
            ours = to_irreps(tensor)
            theirs, samples = chain_to_irreps(tensor, layout, D)
            assert samples.names == to_irreps.samples(tensor).names
            assert torch.equal(samples.values, to_irreps.samples(tensor).values), "rows differ"
            if basis == "featomic":
                assert torch.equal(ours, theirs), f"chain != adapter ({basis}, {layout})"
            else:
                assert torch.allclose(ours, theirs, **tol), f"chain != adapter ({basis}, {layout})"

            back = to_irreps.inverse()(ours, samples)
            back_chain = ChainInverse(tensor, layout, D)(theirs, samples)
            assert back.keys == back_chain.keys == tensor.keys
            for b1, b2, b0 in zip(back.blocks(), back_chain.blocks(), tensor.blocks()):
                assert b1.samples == b2.samples == b0.samples
                assert b1.properties == b2.properties == b0.properties
                assert torch.allclose(b1.values, b2.values, **tol)
                assert torch.allclose(b1.values, b0.values, **tol)


# ---------------------------------------------------------------------- timing


def measure(
    variants: Dict[str, Callable[[], object]], rounds: int, min_run_time: float, threads: int
) -> Dict[str, float]:
    """Median seconds per call of every variant, measured in interleaved rounds (the
    order is shuffled in each round) and pooled over all rounds' blocks."""
    timers = {
        name: Timer(stmt="f()", globals={"f": f}, num_threads=threads)
        for name, f in variants.items()
    }
    for f in variants.values():  # warm up (TorchScript profiling runs, allocator)
        for _ in range(3):
            f()
    times: Dict[str, List[float]] = {name: [] for name in variants}
    faults: Dict[str, List[int]] = {name: [0, 0] for name in variants}  # faults, calls
    names = list(variants)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            # faults between the end of the first timed block and the end of the
            # last (the warm-up of blocked_autorange and the first block excluded)
            marks: List[Tuple[int, int]] = []

            def mark(number, _time):
                marks.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt, number))

            m = timers[name].blocked_autorange(callback=mark, min_run_time=min_run_time)
            if len(marks) > 1:
                faults[name][0] += marks[-1][0] - marks[0][0]
                faults[name][1] += sum(number for _, number in marks[1:])
            times[name].extend(m.times)
    for name, (count, calls) in faults.items():
        FAULTS[name] = count / calls if calls > 0 else float("nan")
    return {name: statistics.median(t) for name, t in times.items()}


#: minor page faults per call of every variant during its timing (fresh memory
#: pages: on this VM about 2.5 us each), filled by measure()
FAULTS: Dict[str, float] = {}


def forward_backward(
    module, inputs: Tuple, grads, params: List[torch.Tensor]
) -> Callable[[], None]:
    def run():
        for p in params:
            p.grad = None
        out = module(*inputs)
        if isinstance(out, tuple):
            out = out[0]
        if isinstance(out, torch.Tensor):
            out.backward(grads)
        else:  # a TensorMap
            torch.autograd.backward([b.values for b in out.blocks()], grads)

    return run


class StepToIrreps(torch.nn.Module):
    """Forward and backward of a scripted TensorMapToIrreps, in TorchScript."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, tensor: TensorMap, grad: torch.Tensor):
        self.module(tensor).backward(grad)


class StepToTensorMap(torch.nn.Module):
    """Forward and backward of a scripted IrrepsToTensorMap, in TorchScript: the
    gradient of every output block in one ``torch.autograd.backward``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, samples: Labels, grads: List[torch.Tensor]):
        values: List[torch.Tensor] = []
        for block in self.module(x, samples).blocks():
            values.append(block.values)
        grad_tensors: List[Optional[torch.Tensor]] = []
        for g in grads:
            grad_tensors.append(g)
        torch.autograd.backward(values, grad_tensors)


def scripted_forward_backward(
    module, inputs: Tuple, grads, params: List[torch.Tensor]
) -> Callable[[], None]:
    """forward_backward for a scripted module, the whole step in TorchScript (as in a
    scripted training step): without the Python-side cost of reading 63 output
    blocks and of torch.autograd.backward's Python wrapper (about 0.5 ms here),
    which is not the adapter's."""
    if not isinstance(module, torch.jit.ScriptModule):
        raise TypeError("scripted_forward_backward needs a scripted module")
    if len(inputs) == 1:
        step = torch.jit.script(StepToIrreps(module))
    else:
        step = torch.jit.script(StepToTensorMap(module))
        grads = list(grads)

    def run():
        for p in params:
            p.grad = None
        if len(inputs) == 1:
            step(inputs[0], grads)
        else:
            step(inputs[0], inputs[1], grads)

    return run


def script(module):
    return torch.jit.script(module)


class OutOfCacheCopy:
    """A copy of the reference bytes whose source and destination are not in the
    cache: each call copies the next of 8 preallocated pairs (150 MB in all for
    float32, beyond the 32 MiB L3), which is where the adapters' inputs and outputs
    live in practice; the clone baseline reuses one pair, which stays cached."""

    def __init__(self, like: torch.Tensor, pairs: int = 8):
        self.pairs = [(torch.randn_like(like), torch.empty_like(like)) for _ in range(pairs)]
        self.next = 0

    def __call__(self):
        src, dst = self.pairs[self.next]
        self.next = (self.next + 1) % len(self.pairs)
        return dst.copy_(src)


def reference_variants(
    args, dtype_name: str
) -> Tuple[Dict[str, Callable], Dict[str, dict], int]:
    """Every variant for one dtype, with a description of each."""
    dtype = DTYPES[dtype_name]
    tensor = featomic_like(args.systems, args.atoms, args.lmax, args.radial, dtype=dtype)
    tensor_g = featomic_like(
        args.systems, args.atoms, args.lmax, args.radial, dtype=dtype, requires_grad=True
    )
    params = leaves(tensor_g)
    size = nbytes(tensor)
    buffer = torch.randn(size // tensor.block(0).values.element_size(), dtype=dtype)

    variants: Dict[str, Callable] = {}
    info: Dict[str, dict] = {}

    def add(name, f, **kw):
        variants[name] = f
        info[name] = dict(dtype=dtype_name, **kw)

    add(f"clone {dtype_name}", lambda: buffer.clone(), direction="-", impl="clone", basis="-",
        layout="-", mode="fwd")
    add(f"copy out of cache {dtype_name}", OutOfCacheCopy(buffer), direction="-",
        impl="copy-ooc", basis="-", layout="-", mode="fwd")
    for basis in ("featomic", "e3nn"):
        D = e3nn_basis_change(args.lmax, dtype) if basis == "e3nn" else None
        for layout in ("mul_ir", "ir_mul"):
            common = dict(basis=basis, layout=layout)
            # ---- TensorMap -> irreps
            eager = TensorMapToIrreps(tensor, basis=basis, layout=layout)
            x, samples = chain_to_irreps(tensor, layout, D)
            grad_x = torch.randn_like(x)
            add(f"chain to_irreps fwd {dtype_name} {basis} {layout}",
                (lambda l=layout, d=D: chain_to_irreps(tensor, l, d)),
                direction="to_irreps", impl="chain", mode="fwd", **common)
            add(f"chain to_irreps fwd+bwd {dtype_name} {basis} {layout}",
                forward_backward(lambda t, l=layout, d=D: chain_to_irreps(t, l, d),
                                 (tensor_g,), grad_x, params),
                direction="to_irreps", impl="chain", mode="fwd+bwd", **common)
            fused = TensorMapToIrreps(tensor, basis=basis, layout=layout, kernel="fused")
            for impl, module in (
                ("eager", eager), ("script", script(eager)), ("script-fused", script(fused))
            ):
                add(f"to_irreps fwd {dtype_name} {basis} {layout} {impl}",
                    (lambda m=module: m(tensor)),
                    direction="to_irreps", impl=impl, mode="fwd", **common)
                fb = forward_backward if impl == "eager" else scripted_forward_backward
                add(f"to_irreps fwd+bwd {dtype_name} {basis} {layout} {impl}",
                    fb(module, (tensor_g,), grad_x, params),
                    direction="to_irreps", impl=impl, mode="fwd+bwd", **common)
            # ---- irreps -> TensorMap
            inverse = eager.inverse()
            chain_inverse = ChainInverse(tensor, layout, D)
            x_g = x.clone().requires_grad_(True)
            grads_tm = [torch.randn_like(v) for v in leaves(tensor)]
            add(f"chain to_tensor_map fwd {dtype_name} {basis} {layout}",
                (lambda c=chain_inverse, x=x, s=samples: c(x, s)),
                direction="to_tensor_map", impl="chain", mode="fwd", **common)
            add(f"chain to_tensor_map fwd+bwd {dtype_name} {basis} {layout}",
                forward_backward(chain_inverse, (x_g, samples), grads_tm, [x_g]),
                direction="to_tensor_map", impl="chain", mode="fwd+bwd", **common)
            inverse_fused = fused.inverse()
            for impl, module in (
                ("eager", inverse), ("script", script(inverse)),
                ("script-fused", script(inverse_fused)),
            ):
                add(f"to_tensor_map fwd {dtype_name} {basis} {layout} {impl}",
                    (lambda m=module, x=x, s=samples: m(x, s)),
                    direction="to_tensor_map", impl=impl, mode="fwd", **common)
                fb = forward_backward if impl == "eager" else scripted_forward_backward
                add(f"to_tensor_map fwd+bwd {dtype_name} {basis} {layout} {impl}",
                    fb(module, (x_g, samples), grads_tm, [x_g]),
                    direction="to_tensor_map", impl=impl, mode="fwd+bwd", **common)
    return variants, info, size


def print_table(results: Dict[str, float], info: Dict[str, dict]) -> None:
    clone = {i["dtype"]: results[n] for n, i in info.items() if i["impl"] == "clone"}
    chain = {}
    for n, i in info.items():
        if i["impl"] == "chain":
            chain[(i["direction"], i["dtype"], i["basis"], i["layout"], i["mode"])] = results[n]
    header = (
        f"| {'direction':<13} | {'dtype':<7} | {'basis':<8} | {'layout':<6} | {'pass':<7} | "
        f"{'impl':<12} | {'median':>10} | {'ratio to clone':>14} | {'speed-up vs chain':>17} | "
        f"{'faults/call':>11} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    order = {"clone": 0, "copy-ooc": 1, "chain": 2, "eager": 3, "script": 4, "script-fused": 5}
    names = sorted(
        results,
        key=lambda n: (
            info[n]["dtype"], info[n]["direction"] != "-", info[n]["direction"],
            info[n]["basis"], info[n]["layout"], info[n]["mode"], order[info[n]["impl"]],
        ),
    )
    for n in names:
        i = info[n]
        t = results[n]
        ratio = t / clone[i["dtype"]]
        key = (i["direction"], i["dtype"], i["basis"], i["layout"], i["mode"])
        speedup = f"{chain[key] / t:.2f}x" if key in chain else "-"
        print(
            f"| {i['direction']:<13} | {i['dtype']:<7} | {i['basis']:<8} | {i['layout']:<6} | "
            f"{i['mode']:<7} | {i['impl']:<12} | {fmt_time(t):>10} | {ratio:>14.2f} | "
            f"{speedup:>17} | {FAULTS.get(n, float('nan')):>11.1f} |"
        )


#: (label, basis, layout, largest allowed ratio of the forward to a clone)
TARGETS = [
    ("featomic basis, mul_ir", "featomic", "mul_ir", 5.0),
    ("featomic basis, ir_mul", "featomic", "ir_mul", 2.5),
    ("e3nn basis, mul_ir", "e3nn", "mul_ir", 8.0),
]
SPEEDUP_TARGET = 10.0  # forward: chain time / adapter time, at least
BACKWARD_TARGET = 3.0  # fwd+bwd time / fwd time, at most


def print_targets(
    results: Dict[str, float], info: Dict[str, dict], dtype: str = "float32",
    impl: str = "script",
) -> None:
    """The project's targets for the scripted modules on the reference case
    (``impl="script"``: default kernel="torch"; ``"script-fused"``: kernel="fused")."""
    def time_of(direction, impl, basis, layout, mode):
        for n, i in info.items():
            if (i["dtype"], i["direction"], i["impl"], i["basis"], i["layout"], i["mode"]) == (
                dtype, direction, impl, basis, layout, mode
            ):
                return results[n]
        raise KeyError((direction, impl, basis, layout, mode))

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    clone = next(results[n] for n, i in info.items() if i["impl"] == "clone" and i["dtype"] == dtype)
    print(
        f"\ntargets ({dtype}, scripted modules, {impl} = "
        f"{'kernel=torch (default)' if impl == 'script' else 'kernel=fused'}, "
        f"reference case; clone {fmt_time(clone)}):"
        f" fwd/clone <= the value given, fwd speed-up vs chain >= {SPEEDUP_TARGET:g}x,"
        f" (fwd+bwd)/fwd <= {BACKWARD_TARGET:g}x\n"
    )
    print(f"| {'module':<17} | {'variant':<22} | {'fwd / clone':<24} | "
          f"{'fwd speed-up vs chain':<24} | {'(fwd+bwd) / fwd':<24} |")
    print(f"|{'-' * 19}|{'-' * 24}|{'-' * 26}|{'-' * 26}|{'-' * 26}|")
    modules = (("to_irreps", "TensorMapToIrreps"), ("to_tensor_map", "IrrepsToTensorMap"))
    for direction, module in modules:
        for label, basis, layout, max_ratio in TARGETS:
            fwd = time_of(direction, impl, basis, layout, "fwd")
            both = time_of(direction, impl, basis, layout, "fwd+bwd")
            chain = time_of(direction, "chain", basis, layout, "fwd")
            ratio, speedup, backward = fwd / clone, chain / fwd, both / fwd
            cells = (
                f"{ratio:5.2f}x (<={max_ratio:g}x) {verdict(ratio <= max_ratio)}",
                f"{speedup:5.2f}x (>={SPEEDUP_TARGET:g}x) {verdict(speedup >= SPEEDUP_TARGET)}",
                f"{backward:5.2f}x (<={BACKWARD_TARGET:g}x) {verdict(backward <= BACKWARD_TARGET)}",
            )
            print(f"| {module:<17} | {label:<22} | " + " | ".join(f"{c:<24}" for c in cells) + " |")
    copy = next((results[n] for n, i in info.items()
                 if i["impl"] == "copy-ooc" and i["dtype"] == dtype), None)
    if copy is not None:
        print(f"\nthe same bytes copied out of cache (copy-ooc): {fmt_time(copy)} = "
              f"{copy / clone:.2f}x the clone; forward / copy-ooc:")
        for direction, module in modules:
            cells = []
            for label, basis, layout, _ in TARGETS:
                cells.append(f"{label} {time_of(direction, impl, basis, layout, 'fwd') / copy:.2f}x")
            print(f"  {module}: " + ", ".join(cells))


def fmt_time(t: float) -> str:
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


# ---------------------------------------------------------------------- memory


class quiet_stderr:
    """Silence file descriptor 2 (kineto prints its start/stop lines there)."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def peak_memory(f: Callable[[], object]) -> Tuple[int, int]:
    """(peak, retained) bytes allocated through torch's CPU allocator during ``f()``,
    above the level at entry: the running sum of the profiler's ``[memory]`` events
    (profile_memory=True). ``retained`` is what is still allocated when ``f`` returns
    (its output, plus anything autograd saved). Memory outside torch's allocator
    (metatensor's Rust-side Labels indexes, Python objects) is not counted."""
    from torch.profiler import ProfilerActivity, profile

    f()  # warm-up: TorchScript optimisation passes, lazily-built buffers
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = f()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    events.sort()
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    del out
    return peak, live


def page_faults(f: Callable[[], object], calls: int = 10) -> float:
    """Minor page faults per call of ``f`` (first touches of fresh pages) in a loop of
    calls after a warm-up, as in a Timer loop: ``getrusage`` of the process."""
    import resource

    for _ in range(3):
        f()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        f()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def print_memory(args) -> None:
    tensor = featomic_like(args.systems, args.atoms, args.lmax, args.radial, dtype=torch.float32)
    size = nbytes(tensor)
    buffer = torch.zeros(size // 4)
    D = e3nn_basis_change(args.lmax, torch.float32)
    print(
        f"\nPeak memory of one forward (float32, reference case, inputs not requiring grad);"
        f"\ninput block values: {size / 1e6:.2f} MB. 'peak' = peak bytes allocated through"
        f"\ntorch's CPU allocator during the call above the level at entry (profiler"
        f"\nprofile_memory events), 'output' = still allocated after the call, 'extra' ="
        f"\npeak - output (transient intermediates). Rust-side metatensor Labels and the"
        f"\nfused kernel's per-thread work buffers (malloc, about one flat row each) are"
        f"\nnot seen."
        f"\n'faults' = minor page faults per call in a loop of calls (fresh 4 KiB pages the"
        f"\nkernel had to map: glibc gave the memory back to the OS between calls).\n"
    )
    print(f"| {'variant':<42} | {'peak MB':>8} | {'output MB':>9} | {'extra MB':>8} | "
          f"{'extra / input':>13} | {'faults':>7} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 15}|{'-' * 9}|")
    rows = [("clone", lambda: buffer.clone())]
    for basis in ("featomic", "e3nn"):
        d = D if basis == "e3nn" else None
        for layout in ("mul_ir", "ir_mul"):
            m = TensorMapToIrreps(tensor, basis=basis, layout=layout)
            s = script(m)
            x, samples = chain_to_irreps(tensor, layout, d)
            inv = m.inverse()
            inv_s = script(inv)
            ci = ChainInverse(tensor, layout, d)
            fused = script(TensorMapToIrreps(tensor, basis=basis, layout=layout, kernel="fused"))
            fused_inv = script(
                TensorMapToIrreps(tensor, basis=basis, layout=layout, kernel="fused").inverse()
            )
            rows += [
                (f"chain to_irreps {basis} {layout}",
                 lambda l=layout, d=d: chain_to_irreps(tensor, l, d)),
                (f"to_irreps {basis} {layout} eager", lambda m=m: m(tensor)),
                (f"to_irreps {basis} {layout} script", lambda s=s: s(tensor)),
                (f"chain to_tensor_map {basis} {layout}", lambda c=ci, x=x, sa=samples: c(x, sa)),
                (f"to_tensor_map {basis} {layout} eager", lambda m=inv, x=x, sa=samples: m(x, sa)),
                (f"to_tensor_map {basis} {layout} script",
                 lambda m=inv_s, x=x, sa=samples: m(x, sa)),
                (f"to_irreps {basis} {layout} script-fused", lambda s=fused: s(tensor)),
                (f"to_tensor_map {basis} {layout} script-fused",
                 lambda m=fused_inv, x=x, sa=samples: m(x, sa)),
            ]
    for name, f in rows:
        peak, kept = peak_memory(f)
        faults = page_faults(f)
        print(
            f"| {name:<42} | {peak / 1e6:>8.2f} | {kept / 1e6:>9.2f} | "
            f"{(peak - kept) / 1e6:>8.2f} | {(peak - kept) / size:>13.2f} | {faults:>7.0f} |"
        )


def page_cost(args) -> None:
    """What a fresh memory page costs here: first touch of fresh anonymous memory, and
    three fresh buffers of the reference size per call against a clone in a Timer loop
    (which reuses one buffer: glibc keeps a freed block below its trim threshold)."""
    import mmap
    import resource

    tensor = featomic_like(args.systems, args.atoms, args.lmax, args.radial)
    size = nbytes(tensor)
    n = size // 4
    pages = size // 4096
    touch = []
    for _ in range(11):
        m = mmap.mmap(-1, size)
        view = memoryview(m)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for i in range(0, size, 4096):
            view[i] = 1
        touch.append(time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        view.release()
        m.close()
    t = statistics.median(touch)
    print(f"\nfirst touch of a fresh {size / 1e6:.2f} MB mapping: {fmt_time(t)} for {pages} pages "
          f"({t / pages * 1e6:.2f} us per 4 KiB page, {faults} faults; Python loop included)")
    buffer = torch.randn(n)

    def fresh(k: int) -> Callable[[], object]:
        # k buffers alive at once, of slightly different sizes (like the intermediates
        # of a call), each written once
        def run():
            return [torch.empty(n + 1024 * i).fill_(1.0) for i in range(k)]
        return run

    variants = {"clone": lambda: buffer.clone(), "1 fresh": fresh(1), "3 fresh": fresh(3)}
    r = measure(variants, args.rounds, args.min_run_time, args.threads)
    print(f"\n| {'per call':<42} | {'median':>9} | {'faults / call':>13} |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 15}|")
    for name, label in (("clone", "clone of one 9.4 MB tensor"),
                        ("1 fresh", "allocate + fill one 9.4 MB buffer"),
                        ("3 fresh", "allocate + fill three 9.4 MB buffers")):
        print(f"| {label:<42} | {fmt_time(r[name]):>9} | {page_faults(variants[name]):>13.0f} |")


def bandwidth(args) -> None:
    """Where a copy of the reference bytes runs: the clone baseline (one buffer read
    and one written, both reused by the loop, so both stay in the cache) against
    copies too large for the caches (8x the reference bytes, preallocated: no fresh
    pages), and a write-only fill of the same size; times per reference-sized amount."""
    tensor = featomic_like(args.systems, args.atoms, args.lmax, args.radial)
    n = nbytes(tensor) // 4
    big = 8 * n
    src, dst = torch.randn(n), torch.empty(n)
    big_src, big_dst = torch.randn(big), torch.empty(big)
    variants = {
        "clone": lambda: src.clone(),
        "copy_ in cache": lambda: dst.copy_(src),
        "copy_ 8x, out of cache": lambda: big_dst.copy_(big_src),
        "fill_ 8x, out of cache": lambda: big_dst.fill_(1.0),
    }
    r = measure(variants, args.rounds, args.min_run_time, args.threads)
    size = n * 4
    print(f"\nreference bytes: {size / 1e6:.2f} MB float32; times per {size / 1e6:.2f} MB")
    print(f"\n| {'operation':<24} | {'per 9.4 MB':>10} | {'GB/s read + written':>19} | {'ratio to clone':>14} |")
    print(f"|{'-' * 26}|{'-' * 12}|{'-' * 21}|{'-' * 16}|")
    for name in variants:
        scale = 8 if "8x" in name else 1
        t = r[name] / scale
        moved = size * (1 if name.startswith("fill") else 2)
        print(f"| {name:<24} | {fmt_time(t):>10} | {moved / t / 1e9:>19.1f} | "
              f"{t / r['clone']:>14.2f} |")


# ---------------------------------------------------------------------- host syncs


HOST_READ_OPS = (
    "equal", "is_nonzero", "_local_scalar_dense", "item", "nonzero", "unique_dim",
    "_unique2", "unique_consecutive", "bincount", "masked_select", "repeat_interleave",
)


def count_host_reads(f: Callable[[], object]) -> Dict[str, int]:
    """aten operators executed by ``f()`` whose result the host reads, counted with a
    TorchDispatchMode (this sees the operators called from TorchScript and from
    metatensor-torch's C++ too).

    This counts the CPU code path only: on CPU inputs the package compares metadata
    with one ``torch.equal`` per block (``aten::equal``, free on a CPU), where a GPU
    input gathers the same comparisons into one flag read; ``bool()`` of tensors that
    are on the host anyway shows up as ``_local_scalar_dense`` here but is no device
    read on a GPU; and device<->host copies and ``.tolist()`` are invisible on a CPU.
    The device->host reads of a GPU forward, read off the code, are listed in
    benchmarks/README.md."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Dict[str, int] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in HOST_READ_OPS:
                counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Count():
        f()
    return counts


def print_host_reads(args) -> None:
    tensor = featomic_like(args.systems, args.atoms, args.lmax, args.radial)
    n_blocks = len(tensor.keys)
    print(
        f"\nHost reads of one forward on this CPU (reference case, {n_blocks} blocks, 3 center "
        "types): aten ops whose result\ngoes to Python, CPU code path (per-block torch.equal); "
        "for a GPU input see benchmarks/README.md."
    )
    for check in (True, False):
        m = TensorMapToIrreps(tensor, basis="e3nn", layout="mul_ir", check=check)
        x = m(tensor)
        samples = m.samples(tensor)
        inv = m.inverse()
        for name, f in (
            (f"to_irreps eager check={check}", lambda: m(tensor)),
            (f"to_irreps script check={check}", lambda s=script(m): s(tensor)),
        ):
            f()
            print(f"  {name:<32} {count_host_reads(f)}")
    print(f"  {'to_tensor_map eager':<32} {count_host_reads(lambda: inv(x, samples))}")
    print(f"  {'chain to_irreps':<32} {count_host_reads(lambda: chain_to_irreps(tensor, 'mul_ir', None))}")


def print_output_addresses(args, calls: int = 10) -> None:
    """Distinct output addresses over ``calls`` calls (float32, reference case): an
    output written at the address the previous call's output had freed is still in the
    caches when it is written again, one at a new address is not (glibc picks; the
    adapters' other allocations in each call move it)."""
    tensor = featomic_like(args.systems, args.atoms, args.lmax, args.radial)
    buffer = torch.randn(nbytes(tensor) // 4)
    fused = TensorMapToIrreps(tensor, basis="featomic", layout="ir_mul", kernel="fused")
    x, samples = fused(tensor), fused.samples(tensor)
    forward, inverse = script(fused), script(fused.inverse())
    print(f"\nOutput addresses of {calls} consecutive calls (float32, reference case, after 3 "
          "warm-up calls; the previous output freed before each call):")
    for name, f in (
        ("clone", lambda: buffer.clone()),
        ("TensorMapToIrreps script-fused featomic ir_mul", lambda: forward(tensor)),
        ("IrrepsToTensorMap script-fused featomic ir_mul (largest block)",
         lambda: max((b.values for b in inverse(x, samples).blocks()), key=torch.numel)),
    ):
        for _ in range(3):
            f()
        addresses = set()
        for _ in range(calls):
            out = f()
            addresses.add(out.data_ptr())
            del out
        print(f"  {name:<62} {len(addresses)} distinct")


# ---------------------------------------------------------------------- extra modes


def check_overhead(args) -> None:
    print("\ncheck=True vs check=False, TensorMapToIrreps forward, float32, e3nn, mul_ir:\n")
    print(f"| {'case':<24} | {'impl':<6} | {'check=True':>10} | {'check=False':>11} | {'overhead':>8} |")
    print(f"|{'-' * 26}|{'-' * 8}|{'-' * 12}|{'-' * 13}|{'-' * 10}|")
    for systems, atoms in ((1, 8), (args.systems, args.atoms)):
        tensor = featomic_like(systems, atoms, args.lmax, args.radial)
        variants = {}
        for check in (True, False):
            m = TensorMapToIrreps(tensor, basis="e3nn", layout="mul_ir", check=check)
            variants[f"eager {check}"] = lambda m=m: m(tensor)
            variants[f"script {check}"] = lambda s=script(m): s(tensor)
        r = measure(variants, args.rounds, args.min_run_time, args.threads)
        for impl in ("eager", "script"):
            on, off = r[f"{impl} True"], r[f"{impl} False"]
            case = f"{systems} x {atoms} atoms, lmax {args.lmax}"
            print(
                f"| {case:<24} | {impl:<6} | {fmt_time(on):>10} | {fmt_time(off):>11} | "
                f"{(on - off) / off * 100:>7.1f}% |"
            )


def profile_slowest(args) -> None:
    """torch.profiler tables of the scripted modules that the targets are about."""
    from torch.profiler import ProfilerActivity, profile

    plain = featomic_like(args.systems, args.atoms, args.lmax, args.radial)
    with_grad = featomic_like(args.systems, args.atoms, args.lmax, args.radial, requires_grad=True)
    featomic_basis = script(TensorMapToIrreps(plain, basis="featomic", layout="mul_ir"))
    e3nn_basis = script(TensorMapToIrreps(plain, basis="e3nn", layout="mul_ir"))
    grad_module = script(TensorMapToIrreps(with_grad, basis="featomic", layout="mul_ir"))
    x = featomic_basis(plain)
    grad = torch.randn_like(x)
    eager = TensorMapToIrreps(plain, basis="featomic", layout="mul_ir")
    inverse = script(eager.inverse())
    samples = eager.samples(plain)
    for name, f in (
        ("to_irreps fwd script featomic mul_ir", lambda: featomic_basis(plain)),
        ("to_irreps fwd script e3nn mul_ir", lambda: e3nn_basis(plain)),
        ("to_irreps fwd+bwd script featomic mul_ir",
         lambda: grad_module(with_grad).backward(grad)),
        ("to_tensor_map fwd script featomic mul_ir", lambda: inverse(x, samples)),
    ):
        f()
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                f()
        print(f"\nprofile of {name}, float32, reference case (5 calls):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def sweep(args) -> None:
    """Clone / chain / adapters vs size: atoms at lmax 6, then lmax at 16 x 125 atoms;
    TensorMapToIrreps in every kernel and basis, IrrepsToTensorMap (featomic basis,
    mul_ir, kernel=fused) against the hand-written inverse chain."""
    cases = [(1, 8, 6), (1, 125, 6), (4, 125, 6), (16, 125, 6), (64, 125, 6), (400, 125, 6)]
    cases += [(16, 125, l) for l in (2, 4, 8)]
    records = []
    print(f"\n| {'case':<28} | {'MB':>7} | {'clone':>9} | {'chain':>9} | {'eager':>9} | "
          f"{'script':>9} | {'script e3nn':>11} | {'fused':>9} | {'fused e3nn':>10} | "
          f"{'chain/script':>12} | {'chain/fused':>11} | {'inv chain':>9} | {'inv fused':>9} | "
          f"{'inv chain/fused':>15} |")
    print("|" + "|".join(
        "-" * w for w in (30, 9, 11, 11, 11, 11, 13, 11, 12, 14, 13, 11, 11, 17)) + "|")
    for systems, atoms, lmax in cases:
        tensor = featomic_like(systems, atoms, lmax, args.radial)
        size = nbytes(tensor)
        buffer = torch.zeros(size // 4)
        D = e3nn_basis_change(lmax, torch.float32)
        eager = TensorMapToIrreps(tensor, basis="featomic", layout="mul_ir")
        scripted = script(eager)
        scripted_e3nn = script(TensorMapToIrreps(tensor, basis="e3nn", layout="mul_ir"))
        fused_module = TensorMapToIrreps(tensor, basis="featomic", layout="mul_ir", kernel="fused")
        fused = script(fused_module)
        fused_e3nn = script(TensorMapToIrreps(tensor, basis="e3nn", layout="mul_ir", kernel="fused"))
        x, samples = chain_to_irreps(tensor, "mul_ir", None)
        chain_inverse = ChainInverse(tensor, "mul_ir", None)
        inverse_fused = script(fused_module.inverse())
        variants = {
            "script fused": lambda: fused(tensor),
            "script fused e3nn": lambda: fused_e3nn(tensor),
            "clone": lambda: buffer.clone(),
            "chain": lambda: chain_to_irreps(tensor, "mul_ir", None),
            "chain e3nn": lambda: chain_to_irreps(tensor, "mul_ir", D),
            "eager": lambda: eager(tensor),
            "script": lambda: scripted(tensor),
            "script e3nn": lambda: scripted_e3nn(tensor),
            "inverse chain": lambda: chain_inverse(x, samples),
            "inverse script fused": lambda: inverse_fused(x, samples),
        }
        r = measure(variants, args.sweep_rounds, args.min_run_time, args.threads)
        case = f"{systems} x {atoms} atoms, lmax {lmax}"
        print(
            f"| {case:<28} | {size / 1e6:>7.3f} | {fmt_time(r['clone']):>9} | "
            f"{fmt_time(r['chain']):>9} | {fmt_time(r['eager']):>9} | "
            f"{fmt_time(r['script']):>9} | {fmt_time(r['script e3nn']):>11} | "
            f"{fmt_time(r['script fused']):>9} | {fmt_time(r['script fused e3nn']):>10} | "
            f"{r['chain'] / r['script']:>11.2f}x | {r['chain'] / r['script fused']:>10.2f}x | "
            f"{fmt_time(r['inverse chain']):>9} | {fmt_time(r['inverse script fused']):>9} | "
            f"{r['inverse chain'] / r['inverse script fused']:>14.2f}x |",
            flush=True,
        )
        records.append(
            dict(systems=systems, atoms=systems * atoms, lmax=lmax, bytes=size, seconds=r)
        )
        del tensor, buffer, x
    floor = records[0]["seconds"]
    print(
        f"\nper-call floor (1 system x 8 atoms, lmax 6): adapter script "
        f"{fmt_time(floor['script'])}, script fused {fmt_time(floor['script fused'])}, "
        f"eager {fmt_time(floor['eager'])}, chain "
        f"{fmt_time(floor['chain'])}, clone {fmt_time(floor['clone'])}; IrrepsToTensorMap "
        f"script fused {fmt_time(floor['inverse script fused'])}, inverse chain "
        f"{fmt_time(floor['inverse chain'])} "
        f"({floor['inverse chain'] / floor['inverse script fused']:.1f}x)"
    )
    path = os.path.join(HERE, "sweep.json")
    with open(path, "w") as f:
        json.dump(dict(machine=machine(), radial=args.radial, records=records), f, indent=1)
    print(f"wrote {path}; plot it with `python benchmarks/plot.py`")


def random_systems(n_systems: int, n_atoms: int, seed: int = 0):
    """Periodic boxes of H, C and O at liquid-like density, generated here (no
    download): with a 4 A cutoff some centers lack neighbours of some type, so
    featomic gives blocks of one center type different samples."""
    from metatomic.torch import System

    g = torch.Generator().manual_seed(seed)
    types_t = torch.tensor([1, 6, 8], dtype=torch.int32)
    side = (n_atoms / 0.1) ** (1 / 3)  # 0.1 atoms per A^3
    systems = []
    for _ in range(n_systems):
        types = types_t[torch.randint(3, (n_atoms,), generator=g)]
        types[:3] = types_t
        positions = torch.rand(n_atoms, 3, generator=g, dtype=torch.float64) * side
        cell = torch.eye(3, dtype=torch.float64) * side
        systems.append(System(types=types, positions=positions, cell=cell,
                              pbc=torch.tensor([True, True, True])))
    return systems


def featomic_batch(args) -> None:
    """TensorMapToIrreps on real featomic SphericalExpansion batches."""
    calculator = featomic.torch.SphericalExpansion(
        cutoff={"radius": 4.0, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
        density={"type": "Gaussian", "width": 0.3},
        basis={"type": "TensorProduct", "max_angular": args.lmax,
               "radial": {"type": "Gto", "max_radial": args.radial - 1}},
    )
    print(f"\nfeatomic SphericalExpansion (cutoff 4 A, lmax {args.lmax}, {args.radial} radial), "
          "scripted TensorMapToIrreps, featomic basis, mul_ir, forward, float64 as computed\n")
    print(f"| {'batch':<20} | {'blocks':>6} | {'shared samples':>14} | {'MB':>6} | {'clone':>9} | "
          f"{'chain':>9} | {'script':>9} | {'fused':>9} | {'chain/fused':>11} | {'script/fused':>12} |")
    print("|" + "|".join("-" * w for w in (22, 8, 16, 8, 11, 11, 11, 11, 13, 14)) + "|")
    with_rows: List[str] = []
    for n_systems, n_atoms in ((1, 64), (16, 125)):
        with quiet_stderr():
            tensor = calculator(random_systems(n_systems, n_atoms))
        by_center: Dict[int, List[torch.Tensor]] = {}
        for key, block in zip(tensor.keys, tensor.blocks()):
            by_center.setdefault(int(key["center_type"]), []).append(block.samples.values)
        shared = all(
            all(torch.equal(s[0], x) for x in s) for s in by_center.values()
        )
        size = nbytes(tensor)
        buffer = torch.zeros(size // 8, dtype=torch.float64)
        scripted = script(TensorMapToIrreps(tensor, basis="featomic", layout="mul_ir"))
        fused = script(TensorMapToIrreps(tensor, basis="featomic", layout="mul_ir",
                                         kernel="fused"))
        assert torch.equal(fused(tensor), scripted(tensor))
        r = measure(
            {
                "clone": lambda: buffer.clone(),
                "chain": lambda: chain_to_irreps(tensor, "mul_ir", None),
                "script": lambda: scripted(tensor),
                "fused": lambda: fused(tensor),
                "script: forward + samples": lambda: (scripted(tensor), scripted.samples(tensor)),
                "script: forward_with_samples": lambda: scripted.forward_with_samples(tensor),
                "fused: forward + samples": lambda: (fused(tensor), fused.samples(tensor)),
                "fused: forward_with_samples": lambda: fused.forward_with_samples(tensor),
            },
            args.rounds, args.min_run_time, args.threads,
        )
        for impl in ("script", "fused"):
            both, one = r[f"{impl}: forward + samples"], r[f"{impl}: forward_with_samples"]
            with_rows.append(
                f"| {f'{n_systems} x {n_atoms} atoms':<20} | {impl:<6} | {fmt_time(r[impl]):>9} | "
                f"{fmt_time(both):>17} | {fmt_time(one):>20} | {both / one:>14.2f}x | "
                f"{r['chain'] / one:>16.2f}x |"
            )
        print(
            f"| {f'{n_systems} x {n_atoms} atoms':<20} | {len(tensor):>6} | {str(shared):>14} | "
            f"{size / 1e6:>6.2f} | {fmt_time(r['clone']):>9} | {fmt_time(r['chain']):>9} | "
            f"{fmt_time(r['script']):>9} | {fmt_time(r['fused']):>9} | "
            f"{r['chain'] / r['fused']:>10.2f}x | {r['script'] / r['fused']:>11.2f}x |",
            flush=True,
        )
    print("\nthe rows' Labels too (a batch's rows change from call to call): forward() then "
          "samples(), against forward_with_samples() (the metadata work done once); "
          "chain: the metatensor chain, whose output carries its samples\n")
    print(f"| {'batch':<20} | {'impl':<6} | {'forward':>9} | {'forward + samples':>17} | "
          f"{'forward_with_samples':>20} | {'(f + s) / fws':>15} | {'speed-up vs chain':>17} |")
    print("|" + "|".join("-" * w for w in (22, 8, 11, 19, 22, 17, 19)) + "|")
    for row in with_rows:
        print(row)


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory (mallopt): comparisons that alternate variants
    otherwise make it unmap and map again a large output at every switch, and the page
    faults (400-900 per call here for 9.4 MB) drown the difference."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    return (libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
            and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1)


def add_switched(variants: Dict[str, Callable], name: str, f: Callable[[], object],
                 variable: str, values: Sequence[str]) -> None:
    """``f`` as one variant per value of the environment variable (``name|value``)."""
    for value in values:
        variants[f"{name}|{value}"] = WithEnvironment(f, variable, value)


class WithEnvironment:
    """``f()`` with ``os.environ[name] = value`` set just before (both of an A/B pair
    pay the same for it)."""

    def __init__(self, f: Callable[[], object], name: str, value: str):
        self.f, self.name, self.value = f, name, value

    def __call__(self):
        os.environ[self.name] = self.value
        return self.f()


def prefetch(args) -> None:
    """The fused kernel with and without its software prefetching
    (RASCALINE_E3NN_PREFETCH=0), in one process (switched)."""
    switched(args, "RASCALINE_E3NN_PREFETCH", ("0", "1"), ("prefetch off", "prefetch on"),
             "software prefetching in the fused kernel")


def isa(args) -> None:
    """The fused kernel's row loops compiled for baseline x86-64 (SSE2) and for AVX2
    (RASCALINE_E3NN_ISA), in one process (switched)."""
    switched(args, "RASCALINE_E3NN_ISA", ("baseline", "avx2"), ("baseline", "AVX2"),
             "row loops of the fused kernel for baseline x86-64 (SSE2) and AVX2")


def switched(args, variable: str, values: Tuple[str, str], labels: Tuple[str, str],
             title: str) -> None:
    """The fused kernel with an environment variable at each of two values, in one
    process: both modules, bases and layouts, forward alone (its inputs stay cached in
    a loop) and the scripted forward+backward step (each pass reads what the other
    evicted), glibc keeping freed memory (keep_freed_memory)."""
    kept = keep_freed_memory()
    print(f"\nmallopt(M_TRIM_THRESHOLD, 1 GiB), mallopt(M_MMAP_THRESHOLD, 32 MiB): "
          f"{'done' if kept else 'FAILED (faults will show)'}")
    tensor = featomic_like(args.systems, args.atoms, args.lmax, args.radial)
    tensor_g = featomic_like(args.systems, args.atoms, args.lmax, args.radial,
                             requires_grad=True)
    params = leaves(tensor_g)
    buffer = torch.randn(nbytes(tensor) // 4)
    variants: Dict[str, Callable] = {"clone": lambda: buffer.clone()}
    rows = []
    for module_name in ("TensorMapToIrreps", "IrrepsToTensorMap"):
        for basis in ("featomic", "e3nn"):
            for layout in ("mul_ir", "ir_mul"):
                fused = TensorMapToIrreps(tensor, basis=basis, layout=layout, kernel="fused")
                x = fused(tensor)
                samples = fused.samples(tensor)
                if module_name == "TensorMapToIrreps":
                    module = script(fused)
                    forward = (lambda m=module: m(tensor))
                    step = scripted_forward_backward(module, (tensor_g,), torch.randn_like(x),
                                                     params)
                else:
                    module = script(fused.inverse())
                    x_g = x.clone().requires_grad_(True)
                    forward = (lambda m=module, x=x, s=samples: m(x, s))
                    grads = [torch.randn_like(v) for v in leaves(tensor)]
                    step = scripted_forward_backward(module, (x_g, samples), grads, [x_g])
                for mode, f in (("fwd", forward), ("fwd+bwd", step)):
                    name = f"{module_name} {basis} {layout} {mode}"
                    rows.append(name)
                    add_switched(variants, name, f, variable, values)
    r = measure(variants, args.rounds, args.min_run_time, args.threads)
    os.environ.pop(variable, None)
    off, on = labels
    ratio = f"{on} / {off}"
    print(f"\n{title} ({variable}={values[0]} / {values[1]}), reference case, float32, "
          f"scripted, {args.threads} thread(s); clone {fmt_time(r['clone'])}\n")
    print(f"| {'module':<17} | {'basis':<8} | {'layout':<6} | {'pass':<7} | "
          f"{off:>12} | {on:>12} | {ratio:>18} | {'faults/call':>11} |")
    print("|" + "|".join("-" * w for w in (19, 10, 8, 9, 14, 14, 20, 13)) + "|")
    for name in rows:
        module_name, basis, layout, mode = name.split()
        a, b = r[f"{name}|{values[0]}"], r[f"{name}|{values[1]}"]
        faults = f"{FAULTS[f'{name}|{values[0]}']:.0f}, {FAULTS[f'{name}|{values[1]}']:.0f}"
        print(f"| {module_name:<17} | {basis:<8} | {layout:<6} | {mode:<7} | "
              f"{fmt_time(a):>12} | {fmt_time(b):>12} | {b / a:>18.2f} | {faults:>11} |")
    ratios = sorted(r[f"{name}|{values[1]}"] / r[f"{name}|{values[0]}"] for name in rows)
    print(f"\n{ratio}: median {statistics.median(ratios):.2f}, "
          f"range {ratios[0]:.2f}-{ratios[-1]:.2f} over the {len(rows)} rows")


class ConsumeIrreps(torch.nn.Module):
    """A TensorMapToIrreps forward, then a layer reading its output (x @ W)."""

    def __init__(self, module, weight: torch.Tensor):
        super().__init__()
        self.module = module
        self.weight = weight

    def forward(self, tensor: TensorMap) -> torch.Tensor:
        return self.module(tensor) @ self.weight


class ConsumeTensorMap(torch.nn.Module):
    """An IrrepsToTensorMap forward, then a reader of every output block (its sum)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, samples: Labels) -> torch.Tensor:
        total = torch.zeros((), dtype=x.dtype)
        for block in self.module(x, samples).blocks():
            total = total + block.values.sum()
        return total


#: RASCALINE_E3NN_STREAM_MIN_BYTES above every output: ordinary stores only
NEVER_STREAM = str(1 << 40)


def stores(args) -> None:
    """Non-temporal stores for every output (RASCALINE_E3NN_STREAM_MIN_BYTES=0, the
    kernel before session 4), the default (ordinary stores below 4 MiB) and ordinary
    stores for every output, in
    one process: the forward alone and followed by a layer reading its output, for 1,
    4 and 16 systems of the reference case (0.6, 2.4 and 9.4 MB float32), glibc
    keeping freed memory (keep_freed_memory)."""
    kept = keep_freed_memory()
    print(f"\nglibc keeps freed memory (mallopt): {'done' if kept else 'FAILED'}")
    variants: Dict[str, Callable] = {}
    rows = []
    for n_systems in (1, 4, 16):
        tensor = featomic_like(n_systems, args.atoms, args.lmax, args.radial)
        buffer = torch.randn(nbytes(tensor) // 4)
        variants[f"clone {n_systems}"] = (lambda b=buffer: b.clone())
        for layout in ("mul_ir", "ir_mul"):
            fused = TensorMapToIrreps(tensor, basis="featomic", layout=layout, kernel="fused")
            x = fused(tensor)
            samples = fused.samples(tensor)
            weight = torch.randn(x.shape[1], 32)
            inverse = fused.inverse()
            passes = {
                ("TensorMapToIrreps", "fwd"): (lambda m=script(fused), t=tensor: m(t)),
                ("TensorMapToIrreps", "fwd, x @ W"): (
                    lambda m=script(ConsumeIrreps(fused, weight)), t=tensor: m(t)),
                ("IrrepsToTensorMap", "fwd"): (
                    lambda m=script(inverse), x=x, s=samples: m(x, s)),
                ("IrrepsToTensorMap", "fwd, block sums"): (
                    lambda m=script(ConsumeTensorMap(inverse)), x=x, s=samples: m(x, s)),
            }
            for (module_name, mode), f in passes.items():
                name = f"{n_systems}|{module_name}|{layout}|{mode}"
                rows.append((name, nbytes(tensor)))
                add_switched(variants, name, f, "RASCALINE_E3NN_STREAM_MIN_BYTES",
                             ("0", "", NEVER_STREAM))
    r = measure(variants, args.rounds, args.min_run_time, args.threads)
    os.environ.pop("RASCALINE_E3NN_STREAM_MIN_BYTES", None)
    print(f"\nnon-temporal stores always (before), only from 4 MiB (default) and never, "
          f"featomic basis, float32, scripted, {args.threads} thread(s)\n")
    print(f"| {'MB':>5} | {'module':<17} | {'layout':<6} | {'pass':<15} | {'clone':>9} | "
          f"{'always NT':>9} | {'default':>9} | {'never NT':>9} | {'default / always':>16} | "
          f"{'never / always':>14} |")
    print("|" + "|".join("-" * w for w in (7, 19, 8, 17, 11, 11, 11, 11, 18, 16)) + "|")
    for name, size in rows:
        n_systems, module_name, layout, mode = name.split("|")
        before, now, never = r[f"{name}|0"], r[f"{name}|"], r[f"{name}|{NEVER_STREAM}"]
        print(f"| {size / 1e6:>5.1f} | {module_name:<17} | {layout:<6} | {mode:<15} | "
              f"{fmt_time(r[f'clone {n_systems}']):>9} | {fmt_time(before):>9} | "
              f"{fmt_time(now):>9} | {fmt_time(never):>9} | {now / before:>16.2f} | "
              f"{never / before:>14.2f} |")


# ---------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", type=int, default=16)
    parser.add_argument("--atoms", type=int, default=125, help="atoms per system")
    parser.add_argument("--lmax", type=int, default=6)
    parser.add_argument("--radial", type=int, default=8, help="radial functions (n)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=DTYPES)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: reproducible anywhere; on a shared machine the "
        "OpenMP barriers of a multi-threaded run stall whenever another process takes a "
        "core, inflating times up to 10x. On a quiet machine also run --threads $(nproc))",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--min-run-time", type=float, default=0.05,
                        help="seconds per blocked_autorange, per variant and round")
    parser.add_argument("--check-overhead", action="store_true",
                        help="also time check=True against check=False")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler tables of the slowest adapters")
    parser.add_argument("--page-cost", action="store_true",
                        help="only measure the cost of fresh memory pages (first touch)")
    parser.add_argument("--sweep", action="store_true",
                        help="only run the size/lmax sweep, writing benchmarks/sweep.json")
    parser.add_argument("--sweep-rounds", type=int, default=3)
    parser.add_argument("--bandwidth", action="store_true",
                        help="only: the clone baseline against copies and a fill too "
                        "large for the caches")
    parser.add_argument("--prefetch", action="store_true",
                        help="only: the fused kernel with and without software prefetching")
    parser.add_argument("--isa", action="store_true",
                        help="only: the fused kernel's row loops for baseline x86-64 and AVX2")
    parser.add_argument("--stores", action="store_true",
                        help="only: non-temporal stores always, only for large outputs, never")
    parser.add_argument("--featomic", action="store_true",
                        help="only: real featomic SphericalExpansion batches (blocks of a "
                        "center type with different samples)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print("settings:", " ".join(f"{k}={v}" for k, v in vars(args).items()))
    for k, v in machine().items():
        print(f"  {k:<16} {v}")
    sys.stdout.flush()

    if args.sweep:
        sweep(args)
        return
    if args.featomic:
        featomic_batch(args)
        return
    if args.prefetch:
        prefetch(args)
        return
    if args.isa:
        isa(args)
        return
    if args.stores:
        stores(args)
        return
    if args.bandwidth:
        bandwidth(args)
        return
    if args.page_cost:
        page_cost(args)
        return

    for dtype_name in args.dtypes:
        tensor = featomic_like(args.systems, args.atoms, args.lmax, args.radial,
                               dtype=DTYPES[dtype_name])
        verify(tensor, args.lmax)
        n_blocks = len(tensor.keys)
    print("\nverified: the metatensor chain gives the adapters' numbers, rows and blocks "
          "(both bases, both layouts, both directions)")

    results: Dict[str, float] = {}
    info: Dict[str, dict] = {}
    sizes = {}
    for dtype_name in args.dtypes:
        variants, i, size = reference_variants(args, dtype_name)
        sizes[dtype_name] = size
        results.update(measure(variants, args.rounds, args.min_run_time, args.threads))
        info.update(i)
    print(
        f"\nreference case: {args.systems} systems x {args.atoms} atoms, 3 atom types, "
        f"lmax {args.lmax}, {args.radial} radial -> {n_blocks} blocks, "
        + ", ".join(f"{d} {s / 1e6:.2f} MB" for d, s in sizes.items())
    )
    print("median per call; ratio = time / time of a clone of the same bytes; "
          "speed-up = chain time / this time (same direction, dtype, basis, layout, pass)")
    print("faults/call: minor page faults per call while it was timed (after "
          "blocked_autorange's warm-up and first block; memory pages touched for the first "
          "time since the OS mapped them: ~2.5 us each on this VM)")
    print("fwd+bwd: chain and eager from Python (backward of the output, or "
          "torch.autograd.backward over every output block); script and script-fused: "
          "the whole step in TorchScript (StepToIrreps / StepToTensorMap)\n")
    print_table(results, info)
    if "float32" in args.dtypes:
        print_targets(results, info)
        print_targets(results, info, impl="script-fused")

    print_memory(args)
    print_host_reads(args)
    print_output_addresses(args)
    if args.check_overhead:
        check_overhead(args)
    if args.profile:
        profile_slowest(args)
    print("\nload average at the end:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
