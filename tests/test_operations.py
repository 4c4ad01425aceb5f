"""The shape of the data path: a constant number of tensor operations per forward
(whatever the number of blocks), no host read beyond the keys and the one verdict
(the keys alone with ``check=False``), and a data step that ``torch.compile`` takes
whole."""

import warnings
from pathlib import Path

import pytest
import torch
from e3nn import o3

from _synthetic import featomic_like
from _systems import DEVICES
from rascaline_e3nn import TensorMapToIrreps

#: operations that only change the metadata of a tensor (no kernel on a GPU)
VIEWS = {
    "aten::" + name
    for name in (
        "view reshape narrow slice select as_strided transpose permute expand unsqueeze "
        "squeeze t alias _unsafe_view detach movedim split split_with_sizes unbind "
        "lift_fresh contiguous expand_as flatten _reshape_alias unflatten"
    ).split()
}
#: operations whose result the host reads (a device sync each on a GPU), and the
#: mark of the package's own reads (``.tolist()``, which the profiler does not see)
HOST_READS = {
    "aten::equal", "aten::item", "aten::_local_scalar_dense", "aten::nonzero",
    "rascaline_e3nn::host_read",
}


def profile(f):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        f()
    return p.events()


def top_level_ops(f):
    """Names of the non-view aten operations ``f()`` runs: those called directly, and
    those a view-like call runs (the copy of a ``reshape`` or ``contiguous`` that
    cannot be a view); operations nested in another one are its own business."""
    names = []
    for event in profile(f):
        if not event.name.startswith("aten::") or event.name in VIEWS:
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name in VIEWS:
            parent = parent.cpu_parent
        if parent is None or not parent.name.startswith("aten::"):
            names.append(event.name)
    return names


def host_reads(f):
    """The host reads of ``f()``: the reading operations, and the package's marked
    reads, not counting those nested in another read (``bool(t)`` is an
    ``aten::is_nonzero`` calling ``aten::item`` calling ``_local_scalar_dense``)."""
    reads = []
    for event in profile(f):
        if event.name not in HOST_READS:
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name not in HOST_READS:
            parent = parent.cpu_parent
        if parent is None:
            reads.append(event.name)
    return reads


def test_host_reads_are_counted_on_the_cpu():
    """The counter sees every kind of read the metadata steps make, ``.tolist()``
    included (through ``host_read``)."""
    from rascaline_e3nn._batch import host_read

    t = torch.arange(3)
    assert host_reads(lambda: host_read(t)) == ["rascaline_e3nn::host_read"]
    assert len(host_reads(lambda: (bool(t.any()), int(t[0]), torch.equal(t, t)))) == 3
    assert host_reads(lambda: t.tolist()) == []  # invisible: hence host_read


def test_the_package_reads_the_host_only_through_host_read():
    """``.tolist()`` is invisible to the profiler on the CPU: outside error messages
    (``int_list``) the package calls it in ``host_read`` only."""
    import inspect

    import rascaline_e3nn
    from rascaline_e3nn import _batch

    package = Path(rascaline_e3nn.__file__).parent
    allowed = {inspect.getsource(_batch.host_read), inspect.getsource(_batch.int_list)}
    for path in package.glob("*.py"):
        source = path.read_text()
        for allowed_source in allowed:
            source = source.replace(allowed_source, "")
        # doctests and f-strings of construction-time errors aside
        calls = [
            line for line in source.splitlines()
            if ".tolist()" in line and ">>>" not in line and "{" not in line
        ]
        assert not calls, (path.name, calls)


def maps():
    # 63 blocks (3 center types, lmax 6) and 175 blocks (5 center types)
    return {
        3: featomic_like(2, 12, 6, 4, types=(1, 6, 8)),
        5: featomic_like(2, 12, 6, 4, types=(1, 6, 7, 8, 9)),
    }


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("basis", ["featomic", "e3nn"])
def test_operations_do_not_grow_with_blocks(basis, check):
    counts = {}
    for n_types, tensor in maps().items():
        module = TensorMapToIrreps(tensor, basis=basis, check=check)
        scripted = torch.jit.script(module)
        for name, m in (("eager", module), ("scripted", scripted)):
            m(tensor)  # warm-up (TorchScript profiles its first calls)
            m(tensor)
            ops = top_level_ops(lambda: m(tensor))
            assert len(ops) <= 60, (n_types, name, sorted(ops))
            # host reads: the keys (torch.equal with the template's), and with
            # check=True the verdict of every check, when the blocks of a group share
            # their samples
            reads = host_reads(lambda: m(tensor))
            assert reads == ["aten::equal"] + (["rascaline_e3nn::host_read"] if check else []), (
                n_types, name, reads
            )
            counts[(n_types, name)] = len(ops)
    for name in ("eager", "scripted"):
        assert len(tensor.keys) == 175 and counts[(5, name)] - counts[(3, name)] <= 10


@pytest.mark.parametrize("basis", ["featomic", "e3nn"])
def test_inverse_operations_do_not_grow_with_blocks(basis):
    """The inverse reads the same tables backwards: per row group one gather, one row
    gather and one GEMM per l >= 2; the rows of each group and every check in one
    host read (a .tolist())."""
    counts = {}
    for n_types, tensor in maps().items():
        to_irreps = TensorMapToIrreps(tensor, basis=basis)
        x, samples = to_irreps.forward_with_samples(tensor)
        module = to_irreps.inverse()
        for name, m in (("eager", module), ("scripted", torch.jit.script(module))):
            m(x, samples)
            m(x, samples)
            ops = top_level_ops(lambda: m(x, samples))
            assert len(ops) <= 60, (n_types, name, sorted(ops))
            # one read: the rows of each group and the verdict of every check
            reads = host_reads(lambda: m(x, samples))
            assert reads == ["rascaline_e3nn::host_read"], (n_types, name, reads)
            counts[(n_types, name)] = len(ops)
    for name in ("eager", "scripted"):
        assert counts[(5, name)] - counts[(3, name)] <= 10


def test_batch_whose_blocks_hold_different_samples_reads_the_host_once_more(lode_like_batch):
    tensor = lode_like_batch
    module = TensorMapToIrreps(tensor)
    module(tensor)
    # the keys, the verdict, then the union of the samples of a row group: its size
    # and the exact comparison of the blocks of a class, read once
    reads = host_reads(lambda: module(tensor))
    assert reads == ["aten::equal"] + ["rascaline_e3nn::host_read"] * 2, reads


@pytest.fixture
def lode_like_batch():
    """featomic's SphericalExpansion of separate molecules: the blocks of one center
    type hold different samples (C-H only methane's carbon, C-O only CO's)."""
    from _systems import molecules, spherical_expansion

    return spherical_expansion()(molecules())


def test_data_step_compiles_with_fullgraph_and_inductor():
    """``move`` is pure tensor code: inductor compiles it whole, and its result is the
    eager one, for two batch sizes."""
    torch._dynamo.reset()
    results = []
    for n_systems in (2, 3):
        tensor = featomic_like(n_systems, 10, 3, 3, types=(1, 8), dtype=torch.float64)
        module = TensorMapToIrreps(tensor)
        groups, columns, order, _ = module._read.read(tensor, None)
        compiled = torch.compile(module.move, fullgraph=True, backend="inductor")
        results.append((compiled(groups, columns, order), module(tensor)))
    for compiled_out, eager_out in results:
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-12, atol=1e-12)


def compile_model_over_batches():
    """Compile a model holding the adapter (and an e3nn layer) and run it on 5
    batches of other sizes and compositions: the graphs dynamo compiles."""
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    template = featomic_like(1, 6, 2, 3, types=(1, 8), dtype=torch.float64)
    to_irreps = TensorMapToIrreps(template)
    linear = o3.Linear(to_irreps.irreps_out, "4x0e+2x1o").double()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_irreps = to_irreps
            self.linear = linear

        def forward(self, tensor):
            return self.linear(self.to_irreps(tensor))

    model = Model()
    compiled = torch.compile(model, backend=counting)
    for n_systems, n_atoms, seed in [(2, 6, 1), (3, 9, 2), (1, 11, 3), (4, 7, 4), (2, 13, 5)]:
        tensor = featomic_like(n_systems, n_atoms, 2, 3, types=(1, 8), dtype=torch.float64, seed=seed)
        torch.testing.assert_close(compiled(tensor), model(tensor), rtol=0, atol=0)
    return graphs


def data_step_graphs(graphs):
    """The graphs holding the data step (its gathers with the column map)."""
    return [g for g in graphs if any("gather" in str(n.target) for n in g.graph.nodes)]


def test_compiled_model_does_not_recompile_across_batches():
    """A model holding the adapter, compiled whole: the metadata step is one graph
    break; the data step compiles once for all 5 batches, since the batch dimensions
    the metadata step returns are marked dynamic (the e3nn layer after the break
    compiles twice: the first call specialises its batch size)."""
    graphs = compile_model_over_batches()
    assert len(data_step_graphs(graphs)) == 1, len(graphs)
    assert len(graphs) <= 3, len(graphs)


def test_compile_test_sees_the_dynamic_marking(monkeypatch):
    """The control of the test above: without marking the batch dimensions dynamic,
    the data step compiles again for the second batch size."""
    monkeypatch.setattr(torch._dynamo, "maybe_mark_dynamic", lambda *args, **kwargs: None)
    graphs = compile_model_over_batches()
    assert len(data_step_graphs(graphs)) == 2, len(graphs)


@pytest.mark.parametrize("device", DEVICES)
def test_one_device_sync_without_checks(device):
    """check=False: the one sync is the read of the keys' verdict (torch.equal with
    the template's keys)."""
    if device == "cpu":
        pytest.skip("device syncs exist on CUDA only")
    tensor = featomic_like(2, 12, 4, 4, types=(1, 6, 8), dtype=torch.float32)
    module = TensorMapToIrreps(tensor, check=False).to(device)
    tensor = tensor.to(device)
    expected = module(tensor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.cuda.set_sync_debug_mode("warn")
            x = module(tensor)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert torch.equal(x, expected)
