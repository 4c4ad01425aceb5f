import e3nn
import numpy as np
import pytest
import torch

if tuple(int(v) for v in e3nn.__version__.split(".")[:2]) < (0, 5):
    # e3nn 0.4 reads its constants with torch.load, whose weights-only default
    # (torch >= 2.6) refuses the `slice` objects they contain; this must run before
    # anything imports e3nn.o3 (rascaline_e3nn does). The environment variable
    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 works too, but warns on every torch.load.
    torch.serialization.add_safe_globals([slice])


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0xE3)
    np.random.seed(0xE3)


@pytest.fixture
def float64_default():
    """e3nn builds D_from_matrix's generators in the default dtype: float64 here so
    that equivariance can be checked to 1e-12."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)
