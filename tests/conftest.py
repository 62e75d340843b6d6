from __future__ import annotations

import pytest
import torch

from mole.tiny import random_expert, tiny_pixart, tiny_unet, unet_inputs

torch.set_num_threads(2)


@pytest.fixture(params=["sd15", "sd21", "sdxl", "pixart"])
def backbone(request):
    """(model, inputs) for every supported backbone, built tiny from configs; inputs have a non-square latent."""
    kind = request.param
    model = tiny_pixart() if kind == "pixart" else tiny_unet(kind)
    hw = (8, 12) if kind == "pixart" else (16, 12)
    return model.eval(), unet_inputs(model, hw=hw)


@pytest.fixture
def sd15():
    model = tiny_unet("sd15").eval()
    return model, unet_inputs(model, hw=(16, 12))


def out_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def two_experts(model, rank=4, std=0.1):
    return [
        random_expert(model, "face", rank=rank, seed=1, std=std, alpha=2.0 * rank),
        random_expert(model, "hand", rank=rank, seed=2, std=std),
    ]
