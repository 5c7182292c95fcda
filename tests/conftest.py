import os

import pytest
import torch

# Retries of failed reads wait 0-10 ms instead of 0-500 ms and more (scanner.sources.retry): tests that inject
# transient failures stay fast; subprocesses inherit it. Tests of the backoff itself pass a policy.
os.environ.setdefault("SCANNER_RETRY_BASE_DELAY", "0.01")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Test models are tiny: their ops are too small to share out, and on a busy 2-core machine
    # intra-op threads only wait on each other (measured 5x slower with 2 threads under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    # ONNX exports and compiled kernels are cached under $XDG_CACHE_HOME: keep the tests' out of the
    # user's cache (subprocesses inherit the variable).
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture
def recorded_uploads(monkeypatch):
    """scanner.backends.torch_cuda.upload, recording the image shapes of each call: the GPU loaders' tests
    check that a batch's CPU-decoded images travel in one staged upload (on the "meta" device, which
    stands in for a GPU, each image is simply moved)."""
    from scanner.backends import torch_cuda

    calls = []

    def recording_upload(images, device):
        calls.append([tuple(img.shape) for img in images])
        return [img.to(device) for img in images]

    monkeypatch.setattr(torch_cuda, "upload", recording_upload)
    return calls
