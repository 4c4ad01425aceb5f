"""``TensorMapToIrreps`` on a GPU: times beside a ``clone`` of the same bytes, and
host synchronisations of one forward.

1. A featomic-like map (16 systems x 125 atoms (4 on the CPU), 3 types, lmax 6, 8 radial functions;
   float32 and float64) moved to the device: forward and forward+backward of the
   default module (``.to(device)``), eager and scripted, both bases, beside a
   ``clone`` (forward+backward: a clone and its backward) of the same bytes.
2. A real featomic ``SphericalExpansion`` batch (8 boxes of 64 Na/Cl/O atoms,
   computed on the CPU, then moved): the same for the module of
   ``from_calculator``.
3. Synchronisations: one forward with ``check=False`` and one with ``check=True``,
   each under ``torch.cuda.set_sync_debug_mode("warn")`` (how many warnings, from
   where; ``check=False`` is expected to synchronise once, reading the keys'
   verdict, as ``tests/test_operations.py`` asserts), and ``Labels.position`` /
   ``==`` on device Labels under ``"error"``.

4. ``LodeSphericalExpansion.to_irreps`` on rock-salt boxes of 64 to 4096 atoms:
   the device's result against the CPU's, forward and forward+backward (to the
   positions) times, the CPU's forward beside them up to 512 atoms, and the
   synchronising calls of one forward (``"warn"`` mode).

Every part runs on its own (an error is printed and the next part runs); the results
go to ``$OUT/gpu_results.json`` when ``OUT`` is set.

    python benchmarks/gpu_check.py                 # on a CUDA device
    python benchmarks/gpu_check.py --device cpu    # the same code paths on the CPU
"""

import argparse
import json
import os
import platform
import sys
import time
import traceback
import warnings
from typing import Callable, Dict

import torch
from torch.utils.benchmark import Timer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from metatensor.torch import Labels, TensorMap  # noqa: E402

from rascaline_e3nn import TensorMapToIrreps  # noqa: E402

from bench_adapters import with_grad  # noqa: E402

warnings.filterwarnings("ignore", message=".*TorchScript.*")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

RESULTS: Dict[str, object] = {}


def part(name: str):
    """Run the decorated function now, printing (and recording) any error."""
    def run(fn):
        print(f"\n## {name}", flush=True)
        start = time.time()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"FAILED: {type(e).__name__}: {e}")
            traceback.print_exc(limit=-4, file=sys.stdout)
            RESULTS.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        print(f"({time.time() - start:.1f} s)", flush=True)
        return fn
    return run


def timed(fn: Callable[[], object], min_time: float) -> float:
    """Median seconds of one call (the Timer synchronises CUDA)."""
    for _ in range(2):
        fn()
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(
        min_run_time=min_time).median


def compare(label: str, module, tensor: TensorMap, min_time: float) -> Dict[str, float]:
    """Forward and forward+backward of ``module`` and of a clone of the same bytes."""
    leaves = with_grad(tensor)
    inputs = [b.values for b in leaves.blocks()]
    flat = torch.cat([b.values.reshape(-1) for b in tensor.blocks()])
    flat_leaf = flat.clone().requires_grad_(True)
    with torch.no_grad():
        grad_out = torch.randn_like(module(tensor))
    grad_flat = torch.randn_like(flat)

    def forward():
        with torch.no_grad():
            return module(tensor)

    def forward_backward():
        return torch.autograd.grad(module(leaves), inputs, grad_out, allow_unused=True)

    def clone_forward_backward():
        return torch.autograd.grad(flat_leaf.clone(), [flat_leaf], grad_flat)

    t = {
        "forward": timed(forward, min_time),
        "clone": timed(flat.clone, min_time),
        "forward_backward": timed(forward_backward, min_time),
        "clone_forward_backward": timed(clone_forward_backward, min_time),
    }
    print(f"{label:38s} fwd {1e6 * t['forward']:9.1f} us = "
          f"{t['forward'] / t['clone']:6.1f}x clone ({1e6 * t['clone']:7.1f} us)   "
          f"fwd+bwd {1e6 * t['forward_backward']:9.1f} us = "
          f"{t['forward_backward'] / t['clone_forward_backward']:6.1f}x clone "
          f"({1e6 * t['clone_forward_backward']:7.1f} us)", flush=True)
    return t


def sync_mode(device: str, mode: str):
    """``torch.cuda.set_sync_debug_mode(mode)`` for the ``with`` block (CUDA only)."""
    class Mode:
        def __enter__(self):
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode(mode)

        def __exit__(self, *exc):
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode("default")
            return False
    return Mode()


def raises_sync(device: str, fn: Callable[[], object]) -> Dict[str, object]:
    """Run ``fn`` once under sync debug mode "error": did it raise, and where."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    try:
        with sync_mode(device, "error"):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return {"raised": False}
    except Exception as e:  # noqa: BLE001
        frames = traceback.extract_tb(e.__traceback__)
        return {
            "raised": True,
            "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "where": [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                      for f in frames[-3:]],
        }


def counts_syncs(device: str, fn: Callable[[], object]) -> Dict[str, object]:
    """Run ``fn`` once under sync debug mode "warn": the warnings and their sources."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sync_mode(device, "warn"):
            fn()
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where: Dict[str, int] = {}
    for w in syncs:
        key = f"{os.path.basename(w.filename)}:{w.lineno} {str(w.message).splitlines()[0][:80]}"
        where[key] = where.get(key, 0) + 1
    return {"warnings": len(syncs), "where": where}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timing per measure (0.2; 0.05 on the CPU)")
    parser.add_argument("--systems", type=int, default=None,
                        help="systems of the featomic-like map (16; 4 on the CPU)")
    parser.add_argument("--atoms", type=int, default=125)
    parser.add_argument("--lode-sides", type=int, nargs="+", default=[4, 6, 8, 10, 13, 16],
                        help="LodeSphericalExpansion on rock-salt boxes of side**3 atoms")
    args = parser.parse_args()
    device = args.device
    on_gpu = device.startswith("cuda")
    if args.min_time is None:
        args.min_time = 0.2 if on_gpu else 0.05
    if args.systems is None:
        args.systems = 16 if on_gpu else 4

    info = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "settings": vars(args),
    }
    for name in ("metatensor.torch", "featomic.torch", "e3nn"):
        try:
            info[name] = __import__(name, fromlist=["__version__"]).__version__
        except Exception as e:  # noqa: BLE001
            info[name] = f"not importable: {e}"
    RESULTS["info"] = info
    print(json.dumps(info, indent=1))

    maps: Dict[str, TensorMap] = {}
    modules: Dict[str, torch.nn.Module] = {}

    @part("featomic-like maps on the device")
    def _():
        from _synthetic import featomic_like

        on_cpu = {}
        for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
            on_cpu[name] = featomic_like(args.systems, args.atoms, 6, 8, dtype=dtype)
            maps[name] = on_cpu[name].to(device=device)
        for basis in ("e3nn", "featomic"):
            module = TensorMapToIrreps(on_cpu["float64"], basis=basis).to(device)
            modules[basis] = module
            modules[basis + " scripted"] = torch.jit.script(module)
        values = maps["float32"].block(0).values
        print(f"{len(maps['float32'].keys)} blocks on {values.device}, "
              f"{sum(b.values.numel() for b in maps['float32'].blocks()) * 4 / 1e6:.1f} "
              f"MB float32, output {modules['e3nn'](maps['float32']).shape}")
        reference = TensorMapToIrreps(on_cpu["float64"])(on_cpu["float64"])
        assert torch.allclose(modules["e3nn"](maps["float64"]).cpu(), reference,
                              rtol=0, atol=1e-12)

    @part("times, featomic-like maps (ratio to a clone of the same bytes)")
    def _():
        times = {}
        for dtype in ("float32", "float64"):
            for name, module in modules.items():
                label = f"{dtype} {name}"
                try:
                    times[label] = compare(label, module, maps[dtype], args.min_time)
                except Exception as e:  # noqa: BLE001
                    print(f"{label}: FAILED {type(e).__name__}: {e}")
                    times[label] = f"{type(e).__name__}: {e}"
        RESULTS["featomic_like"] = times

    real: Dict[str, object] = {}

    @part("real featomic SphericalExpansion batch (computed on the CPU, then moved)")
    def _():
        from bench_adapters import soap_case

        calculator, types, systems = soap_case()
        with torch.no_grad():
            tensor = calculator(systems)
        module = TensorMapToIrreps.from_calculator(calculator, types)
        reference = module(tensor)
        tensor = tensor.to(device=device)
        module = module.to(device)
        scripted = torch.jit.script(module)
        assert torch.allclose(module(tensor).cpu(), reference, rtol=0, atol=1e-12)
        real.update(tensor=tensor, module=module, types=types, calculator=calculator)
        RESULTS["featomic_soap"] = {
            "eager": compare("featomic SOAP float64 e3nn", module, tensor, args.min_time),
            "scripted": compare("featomic SOAP float64 e3nn scripted", scripted, tensor,
                                args.min_time),
        }

    @part("host synchronisations of one forward")
    def _():
        syncs = {}
        cases = [("featomic-like float32", maps.get("float32"),
                  lambda check: TensorMapToIrreps(maps["float32"].to(device="cpu"),
                                                  check=check))]
        if "tensor" in real:
            cases.append(("featomic SOAP float64", real["tensor"],
                          lambda check: TensorMapToIrreps.from_calculator(
                              real["calculator"], real["types"], check=check)))
        for label, tensor, make in cases:
            if tensor is None:
                continue
            kind = "warn"
            for check in (False, True):
                eager = make(check).to(device)
                for form, module in (("eager", eager), ("scripted", torch.jit.script(eager))):
                    key = f"{label}, check={check}, {form}"
                    try:
                        with torch.no_grad():
                            module(tensor)  # warm up outside the debug mode
                            result = counts_syncs(device, lambda: module(tensor))
                    except Exception as e:  # noqa: BLE001
                        result = {"failed": f"{type(e).__name__}: {e}"}
                    if not check and label.startswith("featomic-like") and "warnings" in result:
                        # blocks of a row group sharing their samples: one sync expected,
                        # the read of the keys' verdict
                        result["expected_on_cuda"] = 1
                    syncs[key] = {"mode": kind, **result}
                    print(f"{key} [{kind}]: {json.dumps(result)}", flush=True)
        RESULTS["syncs"] = syncs

    @part("Labels.position / == on device Labels under sync debug mode 'error'")
    def _():
        keys = maps["float32"].keys
        samples = maps["float32"].block(0).samples
        other = Labels(keys.names, keys.values.clone())
        row = samples.values[len(samples) // 2].clone()
        entry = keys.entry(3)
        checks = {
            "keys device": str(keys.values.device),
            "keys == same values": raises_sync(device, lambda: keys == other),
            "keys.position(entry)": raises_sync(device, lambda: keys.position(entry)),
            "samples.position(tensor)": raises_sync(device, lambda: samples.position(row)),
        }
        for key, value in checks.items():
            print(f"{key}: {json.dumps(value)}")
        print(f"results: keys == other -> {keys == other}, position -> "
              f"{samples.position(row)} (expected {len(samples) // 2})")
        RESULTS["labels"] = checks

    @part("LodeSphericalExpansion on the device: against the CPU, times, synchronisations")
    def _():
        sys.path.insert(0, HERE)
        from bench_lode import HYPERS, rock_salt

        from rascaline_e3nn import LodeSphericalExpansion

        cpu = LodeSphericalExpansion(**HYPERS)
        moved = LodeSphericalExpansion(**HYPERS).to(device)
        direct = moved.to_irreps([11, 17])
        lode: Dict[str, object] = {}
        for side in args.lode_sides:
            n = side ** 3
            system = rock_salt(side)
            on_device = system.to(device)
            expected = cpu.to_irreps([11, 17])([system])
            error = float((direct([on_device]).cpu() - expected).abs().max()
                          / expected.abs().max())

            def forward():
                with torch.no_grad():
                    return direct([on_device])

            def forward_backward():
                s = rock_salt(side, requires_grad=True).to(device)
                return torch.autograd.grad((direct([s]) ** 2).sum(), [s.positions])

            t = {"forward": timed(forward, args.min_time),
                 "forward_backward": timed(forward_backward, args.min_time)}
            t_cpu = {}
            if n <= 512:
                t_cpu["forward"] = timed(lambda: cpu.to_irreps([11, 17])([system]), args.min_time)
            syncs = counts_syncs(device, forward)
            lode[str(n)] = {"relative_error_vs_cpu": error, **t,
                            "cpu_forward": t_cpu.get("forward"), "syncs": syncs}
            print(f"LODE {n:5d} atoms: |device - cpu| / max = {error:.1e}, "
                  f"fwd {1e3 * t['forward']:8.2f} ms, fwd+bwd {1e3 * t['forward_backward']:8.2f} ms"
                  + (f", cpu fwd {1e3 * t_cpu['forward']:8.2f} ms" if t_cpu else "")
                  + f", synchronising calls: {syncs['warnings']}", flush=True)
        RESULTS["lode"] = lode

    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "gpu_results.json")
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
