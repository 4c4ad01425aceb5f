"""The fused CPU kernel against the PyTorch-operator path, on real featomic output.

The rest of the suite runs the default (``kernel="torch"``) against slow references;
these tests pin the fused kernel to it on the same inputs, value for value and
gradient for gradient, so that both stay proved.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import metatensor.torch as mts
from metatensor.torch import Labels, TensorBlock, TensorMap

import rascaline_e3nn
from rascaline_e3nn import IrrepsToTensorMap, TensorMapToIrreps
from rascaline_e3nn import _fused
from _reference import with_grad
from _systems import lode, molecules, spherical_expansion, water_sodium


def test_the_fused_kernel_was_built():
    # CI installs a compiler and ninja: a silent fallback would hide a broken build
    assert rascaline_e3nn.library_path().endswith(".so")
    assert _fused.error() is None
    # the default stays portable: scripted modules without the custom operators
    assert TensorMapToIrreps.__init__.__kwdefaults__["kernel"] == "torch"
    assert IrrepsToTensorMap.__init__.__kwdefaults__["kernel"] == "torch"


@pytest.fixture(
    scope="module",
    params=[
        "lode, one system (fast path)",
        "spherical expansion, batch (generic path)",
        # 8 properties: the unrolled loops and non-temporal stores of the kernel
        # (runs of 32 or 64 bytes); 17: more than the unrolled loops handle
        "spherical expansion, batch, 8 radial",
        "spherical expansion, batch, 17 radial",
    ],
)
def tensor(request):
    if request.param.startswith("lode"):
        return lode(max_angular=3, max_radial=2)([water_sodium()])
    if request.param.endswith("8 radial"):
        return spherical_expansion(max_angular=3, max_radial=7)(molecules())
    if request.param.endswith("17 radial"):
        return spherical_expansion(max_angular=2, max_radial=16)(molecules())
    return spherical_expansion(max_angular=3, max_radial=2)(molecules())


@pytest.fixture(params=["ordinary stores", "non-temporal stores"])
def stores(request, monkeypatch):
    """The kernel streams (non-temporal stores) only outputs of 4 MiB or more, larger
    than these inputs: the second parameter makes it stream everything."""
    if request.param == "non-temporal stores":
        monkeypatch.setenv("RASCALINE_E3NN_STREAM_MIN_BYTES", "0")
    else:
        monkeypatch.delenv("RASCALINE_E3NN_STREAM_MIN_BYTES", raising=False)
    return request.param


def _exact_or_close(a, b, basis):
    if basis == "featomic":
        # the same values moved: bit for bit
        assert torch.equal(a, b)
    else:
        # the same products, summed in another order (float32: 1e8 x float64's bound)
        assert a.dtype == b.dtype
        atol = 1e-14 if a.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("basis", ["featomic", "e3nn"])
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_to_irreps_fused_equals_torch(tensor, basis, layout, dtype, stores):
    tensor = tensor.to(dtype=dtype)
    outputs = []
    for kernel in ["torch", "fused"]:
        module = TensorMapToIrreps(tensor, basis=basis, layout=layout, kernel=kernel)
        assert module._fused == (kernel == "fused")
        inputs, leaves = with_grad(tensor)
        x = module(inputs)
        weights = torch.linspace(-1, 1, x.numel(), dtype=dtype).reshape(x.shape)
        (x * weights).sum().backward()
        outputs.append((x.detach(), [v.grad for v in leaves]))
    _exact_or_close(outputs[0][0], outputs[1][0], basis)
    if basis == "featomic" or dtype == torch.float64:
        for a, b in zip(outputs[0][1], outputs[1][1]):
            _exact_or_close(a, b, basis)


@pytest.mark.parametrize("check", [False, True], ids=["check=False", "check=True"])
@pytest.mark.parametrize("basis", ["featomic", "e3nn"])
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_to_tensor_map_fused_equals_torch(tensor, basis, layout, check, stores):
    forward = TensorMapToIrreps(tensor, basis=basis, layout=layout, kernel="torch")
    samples = forward.samples(tensor)
    x = forward(tensor)
    results = []
    for kernel in ["torch", "fused"]:
        # the batch's layout has channels without blocks for some rows: with
        # check=True, both kernels verify that x is zero there (it is)
        inverse = IrrepsToTensorMap.from_tensor_map(
            tensor, basis=basis, layout=layout, kernel=kernel, check=check
        )
        y = x.clone().requires_grad_()
        back = inverse(y, samples)
        loss = sum((i + 1) * (b.values**2).sum() for i, b in enumerate(back.blocks()))
        loss.backward()
        results.append((back, y.grad))
    for a, b in zip(results[0][0].blocks(), results[1][0].blocks()):
        assert a.samples == b.samples and a.properties == b.properties
        _exact_or_close(a.values.detach(), b.values.detach(), basis)
    _exact_or_close(results[0][1], results[1][1], basis)


@pytest.mark.parametrize("basis", ["featomic", "e3nn"])
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
@pytest.mark.parametrize("case", ["one system", "batch", "property subset"])
def test_fused_gradgradcheck_both_directions(basis, layout, case):
    """Through each fused route: the whole-map operators with blocks sharing their
    samples (one system), with row maps (a batch: blocks of a center type with
    different samples), and the value movers behind the detailed TorchScript path
    (input blocks holding a subset of the template's properties)."""
    calculator = spherical_expansion(max_angular=2, max_radial=1)
    template = calculator(molecules() if case == "batch" else [water_sodium()])
    tensor = template
    if case == "property subset":
        tensor = mts.slice(
            template, "properties", Labels(["n"], torch.tensor([[1]], dtype=torch.int32))
        )
    forward = TensorMapToIrreps(template, basis=basis, layout=layout, kernel="fused")
    inverse = IrrepsToTensorMap.from_tensor_map(
        template, basis=basis, layout=layout, kernel="fused", check=False
    )
    assert inverse._fused
    samples = forward.samples(tensor)
    _, leaves = with_grad(tensor)
    assert forward._fused_map(tensor)[0] == (case != "property subset")
    assert len(inverse._fused_map(forward(tensor), samples)) == 1

    def to_irreps(*values):
        blocks = [
            TensorBlock(v, b.samples, b.components, b.properties)
            for v, b in zip(values, tensor.blocks())
        ]
        return forward(TensorMap(tensor.keys, blocks))

    def to_tensor_map(x):
        return tuple(b.values for b in inverse(x, samples).blocks())

    assert torch.autograd.gradcheck(to_irreps, leaves, fast_mode=True)
    assert torch.autograd.gradgradcheck(to_irreps, leaves, fast_mode=True)
    x = forward(tensor).detach().requires_grad_()
    assert torch.autograd.gradcheck(to_tensor_map, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(to_tensor_map, (x,), fast_mode=True)


def test_scripted_fused_equals_eager(tensor):
    module = TensorMapToIrreps(tensor, kernel="fused")
    scripted = torch.jit.script(module)
    assert torch.equal(scripted(tensor), module(tensor))
    inverse = module.inverse()
    samples = module.samples(tensor)
    x = module(tensor)
    a, b = inverse(x, samples), torch.jit.script(inverse)(x, samples)
    for u, v in zip(a.blocks(), b.blocks()):
        assert torch.equal(u.values, v.values)


def test_unknown_kernel_is_refused(tensor):
    with pytest.raises(ValueError, match="kernel must be one of"):
        TensorMapToIrreps(tensor, kernel="cuda")
    with pytest.raises(ValueError, match="kernel must be one of"):
        IrrepsToTensorMap("1x0e", kernel="fast")


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_samples_fused_equals_torch(tensor, scripted):
    modules = [TensorMapToIrreps(tensor, kernel=k) for k in ("torch", "fused")]
    if scripted:
        modules = [torch.jit.script(m) for m in modules]
    expected, actual = (m.samples(tensor) for m in modules)
    assert actual.names == expected.names
    assert torch.equal(actual.values, expected.values)
    assert actual.values.dtype == torch.int32


@pytest.mark.parametrize("basis", ["featomic", "e3nn"])
def test_batch_with_unsorted_block_samples(basis):
    """The kernel merges a center type's sorted sample lists (featomic's); blocks
    whose samples are not sorted take its sort instead: both give the default path's
    rows and values."""
    batch = spherical_expansion(max_angular=2, max_radial=1)(molecules())
    template = TensorMapToIrreps(batch, basis=basis, kernel="torch")
    blocks = []
    shuffled = 0
    for i, block in enumerate(batch.blocks()):
        n = len(block.samples)
        order = torch.arange(n)
        if n > 2 and i % 2 == 0:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(i))
            shuffled += 1
        blocks.append(TensorBlock(
            values=block.values[order],
            samples=Labels(block.samples.names, block.samples.values[order]),
            components=block.components,
            properties=block.properties,
        ))
    assert shuffled > 0
    tensor = TensorMap(batch.keys, blocks)
    for source in (batch, tensor):
        fused = TensorMapToIrreps(tensor, basis=basis, kernel="fused")
        assert fused._fused_map(source)[0]  # handled by the kernel
        expected = template(source)
        _exact_or_close(fused(source), expected, basis)
        assert fused.samples(source) == template.samples(source)
        # the shuffled map gives the same rows as featomic's (rows are sorted)
        _exact_or_close(fused(source), template(batch), basis)


@pytest.mark.parametrize("basis", ["featomic", "e3nn"])
def test_groups_with_shared_unsorted_samples(basis):
    """The kernel orders the rows by merging every group's rows when each group's are
    sorted (featomic's); a group whose blocks share samples that are not sorted takes
    a stable sort instead: both give the default path's rows and values."""
    batch = spherical_expansion(max_angular=2, max_radial=1)(molecules())
    # every block of a center type with the samples of the group's union (zeros where
    # featomic had none), then one permutation per center type for all its blocks
    dense = TensorMap(batch.keys, [
        TensorBlock(values=v, samples=s, components=b.components, properties=b.properties)
        for b, v, s in _densified(batch)
    ])
    blocks = []
    permutations = {}
    for key, block in dense.items():
        center = int(key["center_type"])
        n = len(block.samples)
        if center not in permutations:
            permutations[center] = torch.randperm(n, generator=torch.Generator().manual_seed(center))
        order = permutations[center]
        blocks.append(TensorBlock(
            values=block.values[order],
            samples=Labels(block.samples.names, block.samples.values[order]),
            components=block.components,
            properties=block.properties,
        ))
    assert any(not torch.equal(p, torch.sort(p).values) for p in permutations.values())
    tensor = TensorMap(dense.keys, blocks)
    template = TensorMapToIrreps(tensor, basis=basis, kernel="torch")
    fused = TensorMapToIrreps(tensor, basis=basis, kernel="fused")
    for source in (dense, tensor):
        assert fused._fused_map(source)[0]  # handled by the kernel
        _exact_or_close(fused(source), template(source), basis)
        assert fused.samples(source) == template.samples(source)
    # the permuted map gives the rows of the sorted one
    _exact_or_close(fused(tensor), template(dense), basis)


def _densified(batch):
    """(block, values, samples) with every block of a center type on the union of the
    type's samples (zeros for the rows it lacks)."""
    unions = {}
    for key, block in batch.items():
        center = int(key["center_type"])
        rows = block.samples.values
        unions[center] = rows if center not in unions else torch.cat([unions[center], rows])
    for center, rows in unions.items():
        unions[center] = torch.unique(rows, dim=0)
    result = []
    for key, block in batch.items():
        rows = unions[int(key["center_type"])]
        values = torch.zeros((len(rows),) + tuple(block.values.shape[1:]), dtype=block.values.dtype)
        index = {tuple(r.tolist()): i for i, r in enumerate(rows)}
        for j, r in enumerate(block.samples.values):
            values[index[tuple(r.tolist())]] = block.values[j]
        result.append((block, values, Labels(block.samples.names, rows)))
    return result


def test_forward_mode_tangents_are_never_dropped():
    """Without inputs requiring grad the kernel skips its autograd Function; dual
    tensors (forward-mode AD) must still reach it, and it refuses them (no jvp) rather
    than returning values without their tangent. The default path propagates them."""
    import torch.autograd.forward_ad as fwAD

    tensor = lode(max_angular=2, max_radial=1)([water_sodium()]).to(dtype=torch.float64)
    fused = TensorMapToIrreps(tensor, kernel="fused")
    default = TensorMapToIrreps(tensor, kernel="torch")
    with fwAD.dual_level():
        dual = TensorMap(tensor.keys, [
            TensorBlock(
                values=fwAD.make_dual(b.values, torch.ones_like(b.values)),
                samples=b.samples, components=b.components, properties=b.properties,
            )
            for b in tensor.blocks()
        ])
        assert fwAD.unpack_dual(default(dual)).tangent is not None
        with pytest.raises(RuntimeError, match="jvp"):
            fused(dual)
        x = fwAD.make_dual(fused(tensor), torch.ones_like(fused(tensor)))
        with pytest.raises(RuntimeError, match="jvp"):
            fused.inverse()(x, fused.samples(tensor))


def test_auto_falls_back_when_the_kernel_is_unavailable():
    """RASCALINE_E3NN_KERNEL=torch stands for a machine where the build fails:
    "auto" falls back to PyTorch operators, "fused" says why it cannot."""
    script = textwrap.dedent(
        """
        import pytest, torch
        from metatensor.torch import Labels, TensorBlock, TensorMap
        from rascaline_e3nn import TensorMapToIrreps
        block = TensorBlock(
            values=torch.ones(1, 1, 1, dtype=torch.float64),
            samples=Labels(["system", "atom"], torch.tensor([[0, 0]])),
            components=[Labels(["o3_mu"], torch.tensor([[0]]))],
            properties=Labels(["n"], torch.tensor([[0]])),
        )
        tensor = TensorMap(Labels(["o3_lambda", "o3_sigma"], torch.tensor([[0, 1]])), [block])
        auto = TensorMapToIrreps(tensor, kernel="auto")
        assert not auto._fused
        assert torch.equal(auto(tensor), torch.ones(1, 1, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="RASCALINE_E3NN_KERNEL=torch"):
            TensorMapToIrreps(tensor, kernel="fused")
        """
    )
    env = dict(os.environ, RASCALINE_E3NN_KERNEL="torch")
    subprocess.run([sys.executable, "-c", script], check=True, env=env)


@pytest.mark.parametrize("kernel", ["torch", "fused"])
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_forward_with_samples_equals_forward_and_samples(tensor, kernel, scripted):
    """One call for both (the metadata work done once) gives exactly what the two
    calls give: values, gradients and rows."""
    module = TensorMapToIrreps(tensor, basis="e3nn", kernel=kernel)
    calls = []
    if kernel == "fused" and not scripted:
        # the fused route: one call of the combined operator, none of the others
        ops = module._ops
        for name in ("to_irreps_samples_map", "to_irreps_map", "samples_map", "to_irreps"):
            def spy(*args, _name=name, _op=getattr(ops, name)):
                calls.append(_name)
                return _op(*args)
            setattr(ops, name, spy)
    if scripted:
        module = torch.jit.script(module)
    source, leaves = with_grad(tensor)
    x, samples = module.forward_with_samples(source)
    if kernel == "fused" and not scripted:
        # the combined operator did the work (no fallback to to_irreps)
        assert calls == ["to_irreps_samples_map"]
    assert torch.equal(x, module(tensor))
    assert samples == module.samples(tensor)
    assert samples.names == ["system", "atom", "center_type"]
    assert len(samples) == x.shape[0]
    # gradients reach the input blocks as through forward()
    weights = torch.randn_like(x)
    grads = torch.autograd.grad((x * weights).sum(), leaves)
    other, other_leaves = with_grad(tensor)
    expected = torch.autograd.grad((module(other) * weights).sum(), other_leaves)
    for a, b in zip(grads, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", ["torch", "fused"])
def test_forward_with_samples_unchecked_duplicates(kernel):
    """check=False with a duplicated sample (Labels built with assume_unique): forward
    returns the rows, the rows' Labels cannot exist; forward_with_samples fails as
    samples() does, instead of returning Labels that drop a row."""
    tensor = lode(max_angular=1, max_radial=1)([water_sodium()])
    blocks = []
    for b in tensor.blocks():
        samples = Labels(
            b.samples.names,
            torch.cat([b.samples.values, b.samples.values[:1]]),
            assume_unique=True,
        )
        values = torch.cat([b.values, b.values[:1]])
        blocks.append(TensorBlock(values, samples, b.components, b.properties))
    duplicated = TensorMap(tensor.keys, blocks)
    module = TensorMapToIrreps(tensor, kernel=kernel, check=False)
    # one more row per center type (the blocks of a center type share their samples)
    n_types = len(torch.unique(tensor.keys.column("center_type")))
    assert module(duplicated).shape[0] == module(tensor).shape[0] + n_types
    for method in (module.samples, module.forward_with_samples):
        with pytest.raises(RuntimeError, match="same label entry multiple times"):
            method(duplicated)


def _both_directions(tensor, basis, layout, dtype, kernel="fused"):
    """Values and gradients of a TensorMapToIrreps and its inverse, in a list."""
    tensor = tensor.to(dtype=dtype)
    to_irreps = TensorMapToIrreps(tensor, basis=basis, layout=layout, kernel=kernel)
    to_tensor_map = to_irreps.inverse()
    samples = to_irreps.samples(tensor)
    inputs, leaves = with_grad(tensor)
    x = to_irreps(inputs)
    x.backward(torch.linspace(-1, 1, x.numel(), dtype=dtype).reshape(x.shape))
    y = x.detach().clone().requires_grad_()
    back = to_tensor_map(y, samples)
    sum((i + 1) * b.values.sum() for i, b in enumerate(back.blocks())).backward()
    return ([x.detach(), y.grad] + [v.grad for v in leaves]
            + [b.values.detach() for b in back.blocks()])


@pytest.mark.parametrize("prefetch", ["1", "0"])
@pytest.mark.parametrize("basis", ["featomic", "e3nn"])
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_fused_equals_torch_with_prefetching_on_and_off(
    tensor, basis, layout, prefetch, monkeypatch
):
    """RASCALINE_E3NN_PREFETCH=0 (the benchmarks' comparison) is a code path of its own:
    both directions, values and gradients, against the PyTorch-operator path."""
    monkeypatch.setenv("RASCALINE_E3NN_PREFETCH", prefetch)
    dtype = tensor.block(0).values.dtype
    results = [_both_directions(tensor, basis, layout, dtype, kernel) for kernel in ["torch", "fused"]]
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        _exact_or_close(a, b, basis)


def test_bad_stream_threshold_is_named(tensor, monkeypatch):
    module = TensorMapToIrreps(tensor, kernel="fused")
    monkeypatch.setenv("RASCALINE_E3NN_STREAM_MIN_BYTES", "4MB")
    with pytest.raises(RuntimeError, match="RASCALINE_E3NN_STREAM_MIN_BYTES"):
        module(tensor)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("basis", ["featomic", "e3nn"])
@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_baseline_and_avx2_row_loops_agree_to_the_bit(
    tensor, basis, layout, dtype, stores, monkeypatch
):
    """The row loops are compiled for baseline x86-64 and for AVX2 (without FMA), the
    latter used where the CPU has it: both directions, values and gradients, must be
    equal to the bit (the same products summed in the same order), so that results do
    not depend on the machine. The PyTorch path pins both (the baseline here, AVX2 in
    the other tests on a CPU that has it)."""
    monkeypatch.delenv("RASCALINE_E3NN_ISA", raising=False)
    if _fused.isa() != "avx2":
        pytest.skip("this CPU has no AVX2: only the baseline row loops run here")
    results = {}
    for isa in ["baseline", "avx2"]:
        monkeypatch.setenv("RASCALINE_E3NN_ISA", isa)
        assert _fused.isa() == isa
        results[isa] = _both_directions(tensor, basis, layout, dtype)
    assert len(results["baseline"]) == len(results["avx2"])
    for a, b in zip(results["baseline"], results["avx2"]):
        assert a.dtype == dtype and torch.equal(a, b)
    monkeypatch.setenv("RASCALINE_E3NN_ISA", "baseline")
    to_irreps = TensorMapToIrreps(tensor.to(dtype=dtype), basis=basis, layout=layout, kernel="torch")
    _exact_or_close(results["baseline"][0], to_irreps(tensor.to(dtype=dtype)), basis)


def test_bad_isa_is_named(tensor, monkeypatch):
    module = TensorMapToIrreps(tensor, kernel="fused")
    monkeypatch.setenv("RASCALINE_E3NN_ISA", "avx512")
    with pytest.raises(RuntimeError, match="RASCALINE_E3NN_ISA must be 'baseline' or 'avx2'"):
        module(tensor)
