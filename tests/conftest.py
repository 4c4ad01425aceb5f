import numpy as np
import pytest
import torch


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
