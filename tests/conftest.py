import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Test models are tiny: their ops are too small to share out, and on a busy 2-core machine
    # intra-op threads only wait on each other (measured 5x slower with 2 threads under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
