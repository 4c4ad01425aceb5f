"""Scripted == eager == saved-and-reloaded-in-a-fresh-process, outputs and gradients."""

import subprocess
import sys
import textwrap
from typing import List

import metatensor.torch as mts
import pytest
import torch
from e3nn import o3
from metatensor.torch import TensorMap
from metatomic.torch import System

from rascaline_e3nn import IrrepsToTensorMap, TensorMapToIrreps
from _reference import with_grad
from _systems import molecules, spherical_expansion, water_sodium


@pytest.fixture(scope="module")
def tensor():
    # a batch: blocks of one center type have different samples (generic path)
    return spherical_expansion(max_angular=3, max_radial=2)(molecules())


def run_both(module, tensor, weights):
    inputs, leaves = with_grad(tensor)
    out = module(inputs)
    (out * weights).sum().backward()
    return out.detach(), [v.grad for v in leaves]


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_to_irreps_scripted_equals_eager(tensor, layout):
    eager = TensorMapToIrreps.from_calculator(
        spherical_expansion(max_angular=3, max_radial=2), [1, 6, 8, 11, 17], layout=layout
    )
    scripted = torch.jit.script(eager)
    weights = torch.randn(len(eager.samples(tensor)), eager.irreps_out.dim, dtype=torch.float64)
    out_e, grads_e = run_both(eager, tensor, weights)
    out_s, grads_s = run_both(scripted, tensor, weights)
    assert torch.equal(out_e, out_s)
    for a, b in zip(grads_e, grads_s):
        assert torch.equal(a, b)
    assert scripted.samples(tensor) == eager.samples(tensor)


def test_to_tensor_map_scripted_equals_eager(tensor):
    conv = TensorMapToIrreps(tensor, layout="ir_mul")
    eager = conv.inverse()
    scripted = torch.jit.script(eager)
    samples = conv.samples(tensor)
    x = conv(tensor).detach()
    outputs = []
    for module in (eager, scripted):
        leaf = x.clone().requires_grad_()
        out = module(leaf, samples)
        total = sum((b.values * (i + 1)).sum() for i, b in enumerate(out.blocks()))
        total.backward()
        outputs.append((out, leaf.grad))
    assert mts.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])


def test_saved_and_loaded_in_a_fresh_process(tmp_path, tensor):
    """Save scripted modules, a TensorMap and the eager results; a fresh Python
    process that never imports rascaline_e3nn loads and runs them, forward and
    backward, and must give the same numbers."""
    conv = TensorMapToIrreps(tensor)
    inverse = conv.inverse()
    torch.jit.save(torch.jit.script(conv), tmp_path / "to_irreps.pt")
    torch.jit.save(torch.jit.script(inverse), tmp_path / "to_tensor_map.pt")
    mts.save(str(tmp_path / "input.mts"), tensor)
    samples = conv.samples(tensor)
    weights = torch.randn(len(samples), conv.irreps_out.dim, dtype=torch.float64)
    torch.save(weights, tmp_path / "weights.pt")

    script = textwrap.dedent(
        """
        import sys, torch
        import metatensor.torch as mts
        from metatensor.torch import TensorBlock, TensorMap
        assert "rascaline_e3nn" not in sys.modules
        path = sys.argv[1]
        to_irreps = torch.jit.load(path + "/to_irreps.pt")
        to_tensor_map = torch.jit.load(path + "/to_tensor_map.pt")
        tensor = mts.load(path + "/input.mts")
        weights = torch.load(path + "/weights.pt")
        leaves = [b.values.detach().clone().requires_grad_() for b in tensor.blocks()]
        inputs = TensorMap(tensor.keys, [
            TensorBlock(values=v, samples=b.samples, components=b.components,
                        properties=b.properties)
            for v, b in zip(leaves, tensor.blocks())
        ])
        x = to_irreps(inputs)
        (x * weights).sum().backward()
        samples = to_irreps.samples(tensor)
        both, both_samples = to_irreps.forward_with_samples(tensor)
        y = x.detach().requires_grad_()
        back = to_tensor_map(y, samples)
        sum(b.values.sum() * (i + 1) for i, b in enumerate(back.blocks())).backward()
        torch.save({"x": x.detach(), "grads": [v.grad for v in leaves],
                    "samples": samples.values, "y_grad": y.grad, "both": both,
                    "both_samples": both_samples.values}, path + "/out.pt")
        mts.save(path + "/back.mts", mts.detach(back))
        assert "rascaline_e3nn" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    loaded = torch.load(tmp_path / "out.pt")

    x, grads = run_both(conv, tensor, weights)
    assert torch.equal(loaded["x"], x)
    for a, b in zip(loaded["grads"], grads):
        assert torch.equal(a, b)
    assert torch.equal(loaded["samples"], samples.values)
    assert torch.equal(loaded["both"], x)
    assert torch.equal(loaded["both_samples"], samples.values)
    y = x.clone().requires_grad_()
    back = inverse(y, samples)
    sum(b.values.sum() * (i + 1) for i, b in enumerate(back.blocks())).backward()
    assert torch.equal(loaded["y_grad"], y.grad)
    assert mts.equal(mts.load(str(tmp_path / "back.mts")), mts.detach(back))


def test_scripted_model_from_systems_to_e3nn_outputs():
    """A whole model scripted: calculator -> TensorMapToIrreps -> e3nn Linear ->
    IrrepsToTensorMap (a per-atom dipole back in featomic's conventions)."""
    calculator = spherical_expansion(max_angular=2, max_radial=1)
    to_irreps = TensorMapToIrreps.from_calculator(calculator, [1, 8, 11])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calculator = calculator
            self.to_irreps = to_irreps
            self.linear = o3.Linear(to_irreps.irreps_out, "1x1o")
            self.to_tensor_map = IrrepsToTensorMap("1x1o")

        def forward(self, systems: List[System]) -> TensorMap:
            features = self.calculator(systems)
            dipoles = self.linear(self.to_irreps(features))
            return self.to_tensor_map(dipoles, self.to_irreps.samples(features))

    model = Model().to(torch.float64)
    scripted = torch.jit.script(model)
    systems = [water_sodium()]
    expected = model(systems)
    actual = scripted(systems)
    assert mts.allclose(expected, actual, rtol=0, atol=1e-15)
    assert actual.block(0).samples.names == ["system", "atom", "center_type"]


def test_torch_compile(tensor):
    conv = TensorMapToIrreps(tensor)
    compiled = torch.compile(conv, backend="eager")
    assert torch.equal(compiled(tensor), conv(tensor))


def test_sequential_does_not_script_a_typed_module_does():
    """TorchScript types a scripted nn.Sequential's input as a Tensor, so a
    Sequential starting with a featomic calculator (List[System] input) does not
    script (eager, it runs); a small module with a typed forward does, and gives the
    eager numbers."""
    calculator = spherical_expansion(max_angular=2, max_radial=1)
    to_irreps = TensorMapToIrreps.from_calculator(calculator, [1, 8, 11])
    linear = o3.Linear(to_irreps.irreps_out, "2x0e + 1x1o").to(torch.float64)
    sequential = torch.nn.Sequential(calculator, to_irreps, linear)
    systems = [water_sodium()]
    expected = sequential(systems)
    with pytest.raises(RuntimeError):
        torch.jit.script(sequential)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calculator = calculator
            self.to_irreps = to_irreps
            self.linear = linear

        def forward(self, systems: List[System]) -> torch.Tensor:
            return self.linear(self.to_irreps(self.calculator(systems)))

    scripted = torch.jit.script(Model())
    torch.testing.assert_close(scripted(systems), expected, rtol=0, atol=1e-14)
