"""The fused CPU kernel: one pass over the data, compiled on first import.

``rascaline_e3nn/csrc/fused.cpp`` registers TorchScript operators:
``to_irreps_map`` / ``from_irreps_map`` read the input TensorMap (or build the output
one) through metatensor-torch's C++ API (``samples_map``: the rows' Labels;
``to_irreps_samples_map``: both at once), and ``to_irreps`` / ``from_irreps`` move the
values, each the other's backward (the change of basis is orthogonal). It is compiled with
``torch.utils.cpp_extension`` against the installed torch the first time a module
asks for it (``kernel="fused"`` or ``"auto"``) or :func:`library_path` is called
(about 2 min on a 2-core VM), then cached under ``$RASCALINE_E3NN_CACHE`` (default
``~/.cache/rascaline_e3nn``), one build per torch version and source.

Set ``RASCALINE_E3NN_KERNEL=torch`` to forbid the build: ``kernel="auto"`` then uses
PyTorch operators and ``kernel="fused"`` raises. ``RASCALINE_E3NN_PREFETCH=0`` turns the
kernel's software prefetching off and ``RASCALINE_E3NN_ISA=baseline`` (or ``avx2``) picks
its row loops, compiled for both, AVX2 by default where the CPU has it (:func:`isa`);
both are read at every call, for benchmarks.
"""

import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from metatensor.torch import Labels, TensorMap

SOURCE = Path(__file__).parent / "csrc" / "fused.cpp"
KERNELS = ("auto", "fused", "torch")

_library: Optional[str] = None
_error: Optional[str] = None


def _metatensor_paths():
    """Headers and libraries of metatensor-core and metatensor-torch (the kernel
    reads TensorMaps directly, through metatensor-torch's C++ API)."""
    import metatensor
    import metatensor_torch
    from metatensor_torch._c_lib import _lib_path

    torch_lib = os.path.dirname(_lib_path())
    torch_include = os.path.join(os.path.dirname(torch_lib), "include")
    core = os.path.dirname(metatensor.__file__)
    core_lib = os.path.join(core, "lib")
    includes = [torch_include, os.path.join(core, "include")]
    flags = [
        "-fopenmp",
        f"-L{torch_lib}", "-lmetatensor_torch", f"-Wl,-rpath,{torch_lib}",
        f"-L{core_lib}", "-lmetatensor", f"-Wl,-rpath,{core_lib}",
    ]
    return includes, flags, metatensor_torch.__version__


#: -fopenmp: at::parallel_for is an inline `#pragma omp parallel`, serial without it;
#: libgomp.so.1 then resolves to the copy torch has already loaded
CFLAGS = ["-O3", "-fopenmp"]


def _build_directory(metatensor_torch_version: str, ldflags) -> Path:
    """One directory per torch / metatensor-torch version, source and flags (so that
    torch.utils.cpp_extension never renames the library to a ``_v1`` version)."""
    digest = hashlib.sha256(
        SOURCE.read_bytes() + repr((CFLAGS, ldflags)).encode()
    ).hexdigest()[:12]
    root = os.environ.get("RASCALINE_E3NN_CACHE", "~/.cache/rascaline_e3nn")
    tag = f"torch-{torch.__version__}-mts-{metatensor_torch_version}-{digest}"
    return Path(root).expanduser() / tag.replace("+", "_")


def load() -> Optional[str]:
    """Build (once) and load the fused kernel; the path of its shared library, or
    None when it is disabled or could not be built (the reason: :func:`error`)."""
    global _library, _error
    if _library is not None or _error is not None:
        return _library
    if os.environ.get("RASCALINE_E3NN_KERNEL", "") == "torch":
        _error = "disabled by RASCALINE_E3NN_KERNEL=torch"
        return None
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:
            # the ninja wheel (a dependency) may sit outside PATH, e.g. in a venv
            # whose bin/ is not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

        includes, ldflags, version = _metatensor_paths()
        directory = _build_directory(version, ldflags)
        directory.mkdir(parents=True, exist_ok=True)
        name = "rascaline_e3nn_fused"
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_include_paths=includes,
            extra_ldflags=ldflags,
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
        _library = str(directory / f"{name}.so")
    except Exception as e:  # no compiler, no ninja, read-only cache, ...
        _error = f"{type(e).__name__}: {e}"
        warnings.warn(
            "rascaline_e3nn: the fused CPU kernel could not be built, falling back to "
            f"PyTorch operators (slower): {_error}",
            stacklevel=2,
        )
    return _library


def error() -> Optional[str]:
    """Why the fused kernel is not available (None when it is)."""
    return _error


def library_path() -> str:
    """Path of the fused kernel's shared library, for ``torch.ops.load_library`` in
    a process (or a C++ program) that loads a scripted module using it without
    importing rascaline_e3nn."""
    path = load()
    if path is None:
        raise RuntimeError("the fused kernel is not available: " + str(_error))
    return path


def isa() -> str:
    """The row loops the fused kernel runs in this process: ``"avx2"`` where the CPU
    has AVX2, ``"baseline"`` (x86-64, SSE2) otherwise or on other architectures;
    ``RASCALINE_E3NN_ISA`` forces one (both give the same results, to the bit)."""
    library_path()
    return torch.ops.rascaline_e3nn.kernel_isa()


def use_fused(kernel: str) -> bool:
    """Whether a module built with ``kernel=`` calls the fused operators."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "torch":
        return False
    available = load() is not None
    if kernel == "fused" and not available:
        raise RuntimeError("kernel='fused' asked for, but " + str(_error))
    return available


class FusedOps(torch.nn.Module):
    """The fused operators, as a submodule. Modules built with ``kernel="torch"``
    hold None instead, and TorchScript does not compile the code behind their
    ``self._ops is not None`` checks: their scripted form never references the
    custom operators."""

    def samples_map(
        self,
        tensor: TensorMap,
        key_names: List[str],
        template_keys: torch.Tensor,
        sample_names: List[str],
        row_key_names: List[str],
        property_names: List[str],
        block_l: List[int],
        block_group: List[int],
        template_properties: List[torch.Tensor],
        group_keys: torch.Tensor,
        check: bool,
    ) -> List[Labels]:
        return torch.ops.rascaline_e3nn.samples_map(
            tensor, key_names, template_keys, sample_names, row_key_names, property_names,
            block_l, block_group, template_properties, group_keys, check,
        )

    def from_irreps_map(
        self,
        x: torch.Tensor,
        samples: Labels,
        all_samples: bool,
        sample_names: List[str],
        row_key_names: List[str],
        group_keys: torch.Tensor,
        keys: Labels,
        components: List[Labels],
        properties: List[Labels],
        block_l: List[int],
        block_group: List[int],
        basis: Optional[torch.Tensor],
        meta: List[int],
        columns: List[int],
        check_holes: bool,
    ) -> List[TensorMap]:
        return torch.ops.rascaline_e3nn.from_irreps_map(
            x, samples, all_samples, sample_names, row_key_names, group_keys, keys,
            components, properties, block_l, block_group, basis, meta, columns,
            check_holes,
        )

    def to_irreps_map(
        self,
        tensor: TensorMap,
        key_names: List[str],
        template_keys: torch.Tensor,
        sample_names: List[str],
        property_names: List[str],
        block_l: List[int],
        block_group: List[int],
        template_properties: List[torch.Tensor],
        group_keys: torch.Tensor,
        check: bool,
        basis: Optional[torch.Tensor],
        meta: List[int],
        columns: List[int],
        dim: int,
    ) -> Tuple[bool, torch.Tensor]:
        return torch.ops.rascaline_e3nn.to_irreps_map(
            tensor, key_names, template_keys, sample_names, property_names, block_l,
            block_group, template_properties, group_keys, check, basis, meta, columns, dim,
        )

    def to_irreps_samples_map(
        self,
        tensor: TensorMap,
        key_names: List[str],
        template_keys: torch.Tensor,
        sample_names: List[str],
        row_key_names: List[str],
        property_names: List[str],
        block_l: List[int],
        block_group: List[int],
        template_properties: List[torch.Tensor],
        group_keys: torch.Tensor,
        check: bool,
        basis: Optional[torch.Tensor],
        meta: List[int],
        columns: List[int],
        dim: int,
    ) -> Tuple[bool, torch.Tensor, List[Labels]]:
        return torch.ops.rascaline_e3nn.to_irreps_samples_map(
            tensor, key_names, template_keys, sample_names, row_key_names, property_names,
            block_l, block_group, template_properties, group_keys, check, basis, meta,
            columns, dim,
        )

    def to_irreps(
        self,
        values: List[torch.Tensor],
        slots: List[int],
        position: torch.Tensor,
        group_rows: List[int],
        basis: Optional[torch.Tensor],
        meta: List[int],
        columns: List[int],
        dim: int,
    ) -> torch.Tensor:
        return torch.ops.rascaline_e3nn.to_irreps(
            values, slots, position, group_rows, basis, meta, columns, dim
        )

    def from_irreps(
        self,
        x: torch.Tensor,
        slots: List[int],
        position: torch.Tensor,
        group_rows: List[int],
        basis: Optional[torch.Tensor],
        meta: List[int],
        columns: List[int],
    ) -> List[torch.Tensor]:
        return torch.ops.rascaline_e3nn.from_irreps(
            x, slots, position, group_rows, basis, meta, columns
        )


def may_fuse() -> bool:
    """False under torch.compile (dynamo), which cannot trace the fused operators
    (they have no fake-tensor implementation): compiled code takes the PyTorch
    operator path. Always True in TorchScript."""
    if not torch.jit.is_scripting():
        return not torch.compiler.is_compiling()
    return True


def fused_basis(e3nn_basis: bool, basis: torch.Tensor) -> Optional[torch.Tensor]:
    """The fused operators' basis argument: the D_l matrices, or None for the
    identity (featomic basis)."""
    if e3nn_basis:
        return basis
    return None


def fused_ops(kernel: str) -> Optional[FusedOps]:
    return FusedOps() if use_fused(kernel) else None
