import os

import torch

# Without CUDA, Triton kernels can only run in Triton's interpreter; the switch must be set before
# triton is first imported (megatron imports it), so the kernels' own tests can run them on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dsmtp.checkpoint import step_dir_name  # noqa: E402
from tests.serve_models import train_checkpoint


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory):
    """The inference tests' trained tiny checkpoint (tests/serve_models.py), shared by their modules."""
    steps = 300
    return train_checkpoint(tmp_path_factory.mktemp("serve") / step_dir_name(steps), steps=steps)
