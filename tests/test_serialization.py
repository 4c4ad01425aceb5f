"""What survives checkpoints and casts: ``state_dict`` holds nothing the conversion
depends on, casts never touch the float64 change of basis, and whole models holding
the adapters pickle, save, freeze and optimise for inference."""

import io
import pickle

import metatensor.torch as mts
import pytest
import torch
from metatensor.torch import Labels, TensorMap

from _synthetic import featomic_like
from rascaline_e3nn import IrrepsToTensorMap, TensorMapToIrreps


def template(types, lmax=3, n_radial=2, n_atoms=6):
    return featomic_like(2, n_atoms, lmax, n_radial, types=types, dtype=torch.float64)


def outputs(to_irreps, inverse, tensor):
    x, samples = to_irreps.forward_with_samples(tensor)
    return x, samples, inverse(x, samples)


def assert_same(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1] == b[1]
    assert mts.equal(a[2], b[2])


# ---------------------------------------------------------------------- state_dict

#: pairs of modules that differ in atom types, basis or layout but share the number
#: of everything a state_dict could hold (so that a table overwritten by a load would
#: go unnoticed by the shapes)
VARIANTS = [
    (dict(types=(1, 8)), dict(types=(1, 6))),
    (dict(types=(1, 8), basis="e3nn"), dict(types=(1, 8), basis="featomic")),
    (dict(types=(1, 8), layout="mul_ir"), dict(types=(1, 8), layout="ir_mul")),
    (dict(types=(1, 6, 8)), dict(types=(1, 8))),
]


def build(types, basis="e3nn", layout="mul_ir", scripted=False):
    to_irreps = TensorMapToIrreps(template(types), basis=basis, layout=layout)
    inverse = to_irreps.inverse()
    if scripted:
        return torch.jit.script(to_irreps), torch.jit.script(inverse)
    return to_irreps, inverse


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: str(o))
def test_loading_another_adapters_state_dict_changes_nothing(options, strict, scripted):
    mine_options, theirs_options = options
    mine = build(**mine_options, scripted=scripted)
    fresh = build(**mine_options, scripted=scripted)
    theirs = build(**theirs_options, scripted=scripted)
    tensor = template(mine_options["types"], n_atoms=7)
    expected = outputs(*fresh, tensor)
    for module, other in zip(mine, theirs):
        module.load_state_dict(other.state_dict(), strict=strict)
    assert_same(outputs(*mine, tensor), expected)
    # a batch with an atom type the module was not built for is still refused
    foreign = template(theirs_options["types"], n_atoms=7)
    if set(theirs_options["types"]) - set(mine_options["types"]):
        with pytest.raises((ValueError, torch.jit.Error), match="not in the layout"):
            mine[0](foreign)
    # nothing derived is in the state_dict (at most an empty device marker)
    for module in mine:
        assert all(v.numel() == 0 for v in module.state_dict().values())


def test_a_model_checkpoint_round_trips_with_adapters_inside():
    """The usual training checkpoint: a model's state_dict (weights and adapters)
    loads strictly into a freshly built model."""
    to_irreps = TensorMapToIrreps(template((1, 8)))
    model = torch.nn.Sequential()
    model.add_module("to_irreps", to_irreps)
    model.add_module("inverse", to_irreps.inverse())
    model.add_module("linear", torch.nn.Linear(3, 3))
    other = torch.nn.Sequential()
    to_irreps = TensorMapToIrreps(template((1, 8)))
    other.add_module("to_irreps", to_irreps)
    other.add_module("inverse", to_irreps.inverse())
    other.add_module("linear", torch.nn.Linear(3, 3))
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.linear.weight, model.linear.weight)


# ---------------------------------------------------------------------- casts

CASTS = {
    "float": lambda m: m.float(),
    "half-double": lambda m: m.half().double(),
    "to-float32": lambda m: m.to(torch.float32),
}


def jit_loaded(module):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("kind", ["eager", "scripted", "loaded"])
def test_casts_keep_the_change_of_basis_in_float64(kind, cast):
    tensor = template((1, 8), lmax=4)
    to_irreps = TensorMapToIrreps(tensor)
    inverse = to_irreps.inverse()
    expected = outputs(to_irreps, inverse, tensor)
    wrap = {"eager": lambda m: m, "scripted": torch.jit.script, "loaded": jit_loaded}[kind]
    cast_to_irreps = CASTS[cast](wrap(TensorMapToIrreps(tensor)))
    cast_inverse = CASTS[cast](wrap(TensorMapToIrreps(tensor).inverse()))
    assert_same(outputs(cast_to_irreps, cast_inverse, tensor), expected)
    # and the cast is harmless before scripting or saving too
    if kind == "eager":
        rescripted = torch.jit.script(CASTS[cast](TensorMapToIrreps(tensor)))
        assert torch.equal(rescripted(tensor), expected[0])


# ---------------------------------------------------------------------- whole models


class Model(torch.nn.Module):
    def __init__(self, tensor):
        super().__init__()
        self.to_irreps = TensorMapToIrreps(tensor)
        self.linear = torch.nn.Linear(self.to_irreps.irreps_out.dim, 5, dtype=torch.float64)
        self.inverse = self.to_irreps.inverse()

    def forward(self, tensor: TensorMap) -> TensorMap:
        x, samples = self.to_irreps.forward_with_samples(tensor)
        x = x + 0.1 * self.linear(x).sum(dim=1, keepdim=True)
        return self.inverse(x, samples)


def test_whole_model_torch_save_and_pickle():
    tensor = template((1, 8), lmax=3)
    model = Model(tensor)
    expected = model(tensor)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert mts.equal(loaded(tensor), expected)
    unpickled = pickle.loads(pickle.dumps(model))
    assert mts.equal(unpickled(tensor), expected)
    assert unpickled.to_irreps.irreps_out == model.to_irreps.irreps_out
    # the copies are independent modules that still script
    assert mts.equal(torch.jit.script(unpickled)(tensor), expected)
    # and still refuse what the original refuses
    with pytest.raises(ValueError, match="not in the layout"):
        unpickled.to_irreps(template((1, 6)))


def test_pickled_model_keeps_its_device_and_options():
    tensor = template((1, 8), lmax=2)
    to_irreps = TensorMapToIrreps(tensor, basis="featomic", layout="ir_mul", check=False)
    copy = pickle.loads(pickle.dumps(to_irreps))
    assert (copy.basis, copy.layout, copy.check) == ("featomic", "ir_mul", False)
    assert torch.equal(copy(tensor), to_irreps(tensor))


@pytest.mark.parametrize("how", ["freeze", "optimize_for_inference"])
def test_freeze_and_optimize_for_inference(how):
    tensor = template((1, 8), lmax=3)
    to_irreps = TensorMapToIrreps(tensor)
    inverse = to_irreps.inverse()
    expected = outputs(to_irreps, inverse, tensor)
    transform = getattr(torch.jit, how)
    frozen_to_irreps = transform(torch.jit.script(to_irreps).eval())
    frozen_inverse = transform(torch.jit.script(inverse).eval())
    x = frozen_to_irreps(tensor)
    assert torch.equal(x, expected[0])
    assert mts.equal(frozen_inverse(x, expected[1]), expected[2])
    # a whole model too (optimize_for_inference may reorder the linear layer's sums)
    model = Model(tensor)
    frozen = transform(torch.jit.script(model).eval())
    assert mts.allclose(frozen(tensor), model(tensor), rtol=1e-13, atol=1e-13)
