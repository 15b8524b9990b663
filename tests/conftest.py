import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Two CPU cores: keep torch from oversubscribing them when tests run subprocesses.
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(**overrides):
    from model import DiTConfig

    config = dict(input_size=8, in_channels=3, patch_size=2, n_layer=2, n_head=2, n_embd=32, num_classes=2)
    config.update(overrides)
    return DiTConfig(**config)


def randomize_(model, scale=0.2, seed=0):
    """Overwrite every parameter with random values, so that the zero-initialised gates
    and output layer no longer hide what the rest of the network computes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def repo():
    return REPO
