import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The models here are tiny: a second intra-op thread gains nothing, and on a loaded 2-core machine it made the
    # Hessian comparison 30x slower (25 s instead of 0.8 s, measured 2026-12-01).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
