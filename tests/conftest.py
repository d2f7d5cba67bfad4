import pytest
import torch

from dsmtp.checkpoint import step_dir_name
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
