"""cuequivariance layers on ``layout="ir_mul"`` LODE features, against the e3nn path.

``TensorMapToIrreps(..., layout="ir_mul")`` gives featomic's LODE features in
cuequivariance's fast layout (``[2l+1, mul]`` per irrep, channel fastest), in e3nn's
basis, which is cuequivariance's ``O3`` basis. Two cuequivariance-torch layers use
them directly: ``cuet.Linear`` into hidden irreps, then ``cuet.FullyConnectedTensorProduct``
of the hidden features with themselves into ``4x0e + 2x1o + 2x1e + 2x2e`` (the ``1e``
pseudo-vectors exist only through parity). ``method="naive"`` is cuequivariance's
PyTorch path, which runs on the CPU (on a GPU, leave ``method`` out for its kernels).

The script checks, in float64:

- the same model in e3nn (``layout="mul_ir"``, ``o3.Linear`` and
  ``o3.FullyConnectedTensorProduct``, the same weights copied over) gives the same
  numbers, once transposed by ``cuet.TransposeIrrepsLayout``;
- the cuequivariance path is equivariant under proper and improper rotations of the
  structures (positions and cell): each ``[2l+1, mul]`` block of the output turns
  with e3nn's ``D_from_matrix``;

and times both paths on the CPU (cuequivariance's naive path is not its fast one).

Run with ``python examples/cuequivariance_layers.py`` (a few seconds).
"""

import argparse
import os
import sys
import time

import cuequivariance as cue
import cuequivariance_torch as cuet
import torch
from e3nn import o3
from tqdm import tqdm

from rascaline_e3nn import TensorMapToIrreps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    accurate_rotation,
    lode_calculator,
    parity_flipped,
    plot_errors,
    rotate,
    structures,
)

OUTPUT_IRREPS = o3.Irreps("4x0e + 2x1o + 2x1e + 2x2e")


def cue_irreps(irreps) -> "cue.Irreps":
    """e3nn irreps as cuequivariance ``O3`` irreps, in the same (e3nn) order: do not
    sort them, cuequivariance puts ``0e`` before ``0o`` where e3nn does the opposite."""
    return cue.Irreps("O3", str(o3.Irreps(irreps)))


def rotate_ir_mul(x: torch.Tensor, irreps, R: torch.Tensor) -> torch.Tensor:
    """``x`` (ir_mul layout) transformed by R: each ``[2l+1, mul]`` block gets e3nn's
    ``D_l(R)`` on its first axis."""
    out = torch.empty_like(x)
    for (mul, ir), sl in zip(o3.Irreps(irreps), o3.Irreps(irreps).slices()):
        D = ir.D_from_matrix(R).to(x.dtype)
        out[:, sl] = (D @ x[:, sl].reshape(-1, ir.dim, mul)).reshape(-1, ir.dim * mul)
    return out


class CueModel(torch.nn.Module):
    """ir_mul features -> ``cuet.Linear`` -> ``cuet.FullyConnectedTensorProduct``
    (hidden x hidden) -> ``OUTPUT_IRREPS``, all ir_mul."""

    def __init__(self, irreps_in, hidden, irreps_out, method: str = "naive"):
        super().__init__()
        options = dict(layout=cue.ir_mul, dtype=torch.float64, method=method)
        self.linear = cuet.Linear(cue_irreps(irreps_in), cue_irreps(hidden), **options)
        self.product = cuet.FullyConnectedTensorProduct(
            cue_irreps(hidden), cue_irreps(hidden), cue_irreps(irreps_out), **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        return self.product(h, h)


class E3nnModel(torch.nn.Module):
    """The same model in e3nn, on mul_ir features."""

    def __init__(self, irreps_in, hidden, irreps_out):
        super().__init__()
        self.linear = o3.Linear(irreps_in, hidden)
        self.product = o3.FullyConnectedTensorProduct(hidden, hidden, irreps_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        return self.product(h, h)


def copy_weights(e3nn_model: E3nnModel, cue_model: CueModel) -> None:
    """cuequivariance's linear and fully connected tensor product order and normalise
    their weights as e3nn does: e3nn's weights, reshaped, give the same maps."""
    with torch.no_grad():
        for name in ("linear", "product"):
            source = getattr(e3nn_model, name).weight
            target = getattr(cue_model, name).weight
            target.copy_(source.reshape(target.shape))


def seconds_per_call(function, x: torch.Tensor, calls: int) -> float:
    with torch.no_grad():
        function(x)  # warm-up
        start = time.perf_counter()
        for _ in range(calls):
            function(x)
    return (time.perf_counter() - start) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mul", type=int, default=8, help="hidden channels per l")
    parser.add_argument("--max-angular", type=int, default=2)
    parser.add_argument("--max-radial", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2,
                        help="cubic cells of the NaCl crystal per axis")
    parser.add_argument("--rotations", type=int, default=3,
                        help="random rotations checked (each proper and improper)")
    parser.add_argument("--calls", type=int, default=20, help="calls timed per path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG", help="draw the errors into this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    default_dtype = torch.get_default_dtype()
    # e3nn builds its weights and Wigner matrices in the default dtype; featomic
    # computes in float64
    torch.set_default_dtype(torch.float64)
    try:
        return run(args)
    finally:
        torch.set_default_dtype(default_dtype)


def run(args):
    torch.manual_seed(args.seed)
    systems = structures(args.repeat)
    atom_types = sorted({int(t) for s in systems for t in s.types})
    calculator = lode_calculator(args.max_angular, args.max_radial)
    ir_mul = TensorMapToIrreps.from_calculator(calculator, atom_types, layout="ir_mul")
    mul_ir = TensorMapToIrreps.from_calculator(calculator, atom_types, layout="mul_ir")
    irreps_in = ir_mul.irreps_out
    hidden = o3.Irreps([(args.mul, (l, (-1) ** l)) for l in range(args.max_angular + 1)])

    e3nn_model = E3nnModel(irreps_in, hidden, OUTPUT_IRREPS)
    cue_model = CueModel(irreps_in, hidden, OUTPUT_IRREPS)
    copy_weights(e3nn_model, cue_model)
    to_ir_mul = cuet.TransposeIrrepsLayout(cue_irreps(OUTPUT_IRREPS), source=cue.mul_ir,
                                           target=cue.ir_mul)
    n_atoms = sum(len(s) for s in systems)
    print(f"cuequivariance {cue.__version__}, cuequivariance-torch {cuet.__version__}; "
          f"{len(systems)} periodic structures, {n_atoms} atoms")
    print(f"LODE -> TensorMapToIrreps(layout='ir_mul') -> {irreps_in} -> cuet.Linear -> "
          f"{hidden} -> cuet.FullyConnectedTensorProduct (with itself) -> {OUTPUT_IRREPS}")

    features = calculator(systems)
    x = ir_mul(features)
    y = cue_model(x).detach()
    y_e3nn = e3nn_model(mul_ir(features)).detach()
    path_difference = float((to_ir_mul(y_e3nn) - y).abs().max() / y.abs().max())
    print(f"cuequivariance (ir_mul) vs e3nn (mul_ir, same weights, transposed): largest "
          f"difference {path_difference:.1e} (relative to the largest output, "
          f"{y.abs().max():.3f})")

    generator = torch.Generator().manual_seed(args.seed)
    errors = {"proper": 0.0, "improper": 0.0}
    # a control: the error against a reference that ignores the outputs' parity
    parity_ignored = float("inf")
    trials = [(accurate_rotation(generator), kind) for _ in range(args.rotations)
              for kind in errors]
    for R, kind in tqdm(trials, desc="rotations", disable=args.quiet, leave=False):
        if kind == "improper":
            R = -R
        y_rotated = cue_model(ir_mul(calculator([rotate(s, R) for s in systems]))).detach()
        error = float((y_rotated - rotate_ir_mul(y, OUTPUT_IRREPS, R)).abs().max()
                      / y.abs().max())
        errors[kind] = max(errors[kind], error)
        if kind == "improper":
            wrong = rotate_ir_mul(y, parity_flipped(OUTPUT_IRREPS), R)
            parity_ignored = min(parity_ignored,
                                 float((y_rotated - wrong).abs().max() / y.abs().max()))
    for kind, error in errors.items():
        print(f"{kind:>8} rotations: cuequivariance output error {error:.1e} (relative)")
    print(f"  (were the outputs' parity ignored, {parity_flipped(OUTPUT_IRREPS)}, improper "
          f"rotations would show errors of at least {parity_ignored:.2f})")

    timings = {
        "cuequivariance (ir_mul, naive)": seconds_per_call(cue_model, x, args.calls),
        "e3nn (mul_ir)": seconds_per_call(e3nn_model, mul_ir(features), args.calls),
    }
    print(f"time per call on {n_atoms} atoms (CPU, layers only): " + ", ".join(
        f"{name} {1000 * t:.2f} ms" for name, t in timings.items()))

    if args.plot:
        plot_errors({"cuequivariance vs e3nn, same weights": path_difference,
                     "output, proper rotations": errors["proper"],
                     "output, improper rotations": errors["improper"],
                     "output, improper, parity ignored (control)": parity_ignored},
                    args.plot, "cuequivariance on ir_mul LODE features (float64)")
        print(f"wrote {args.plot}")

    assert path_difference < 1e-12, path_difference
    assert max(errors.values()) < 1e-10, errors
    return {"path_difference": path_difference, "errors": errors, "timings": timings,
            "parity_ignored": parity_ignored}


if __name__ == "__main__":
    main()
