"""mole-tiny v2's VAE: the edge term of its objective and the ceiling bench (bench/vae_ceiling.py)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import SHARED
from mole.pretrain.train import PretrainError, PretrainOptions, edge_l1

_PATH = Path(__file__).resolve().parents[1] / "bench" / "vae_ceiling.py"
_spec = importlib.util.spec_from_file_location("vae_ceiling", _PATH)
vc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vc)


def test_edge_l1_equals_the_literal_finite_differences():
    x = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 0.0]]]])  # (1, 1, 2, 3)
    rec = torch.tensor([[[[0.5, 0.5, 1.0], [1.0, 3.0, 1.0]]]])
    # horizontal gradients: x (1, 2), (0, -2); rec (0, 0.5), (2, -2) -> |diff| 1, 1.5, 2, 0 -> mean 1.125
    # vertical gradients:   x (2, 1, -3);        rec (0.5, 2.5, 0)  -> |diff| 1.5, 1.5, 3  -> mean 2.0
    assert float(edge_l1(rec, x)) == pytest.approx(0.5 * (1.125 + 2.0))


def test_edge_l1_is_blind_to_a_shift_but_sees_blur_flipped_edges_and_both_directions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    assert float(edge_l1(x + 0.3, x)) == pytest.approx(0.0, abs=1e-6)
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert float(edge_l1(blurred, x)) > 0.2
    # edges of the same size, the other sign: |grad rec| == |grad x|, yet every edge is wrong
    assert float(edge_l1(-x, x)) == pytest.approx(float(edge_l1(torch.zeros_like(x), x)) * 2, rel=1e-5)
    rows = torch.arange(16.0).view(1, 1, 16, 1).expand(1, 1, 16, 16)  # varies down the image only
    assert float(edge_l1(torch.zeros_like(rows), rows)) == pytest.approx(0.5 * 1.0)


def test_v2_options_are_checked_and_named():
    common = dict(data="d", tokenizer="t")
    assert PretrainOptions(**common).latent_channels == 8
    with pytest.raises(PretrainError, match="latent_channels=0"):
        PretrainOptions(**common, latent_channels=0)
    with pytest.raises(PretrainError, match="vae_edge_weight=-1"):
        PretrainOptions(**common, vae_edge_weight=-1.0)


def test_retained_share_and_its_standard_error():
    r, se = vc.retained((0.46, 0.07), (0.92, 0.04))
    assert r == pytest.approx(0.5)
    assert se == pytest.approx(0.5 * math.sqrt((0.07 / 0.46) ** 2 + (0.04 / 0.92) ** 2))
    assert math.isnan(vc.retained((0.1, 0.01), (0.0, 0.0))[0])


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="needs ../shared/data")
def test_ceiling_bench_runs_on_the_shipped_vae_and_a_training_checkpoint(tmp_path):
    from mole.pretrain.model import build_vae

    assert vc.main(["--vae", "mole-tiny", "--data", str(SHARED / "data"), "--out", str(tmp_path / "a"),
                    "--limit", "6"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "a" / "ceiling.json").read_text())
    for kind in ("face", "hand"):
        k = res["kinds"][kind]
        assert k["n"] == 6 and 0 <= k["rate_after"][0] <= 1 and k["l1"][0] > 0.01
    # a run still training: the VAE comes from checkpoints/vae.pt with the run's latent channels
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "pretrain_options.json").write_text(json.dumps({"seed": 0, "latent_channels": 2}))
    torch.save({"vae": build_vae(0, 2).state_dict(), "step": 7}, run / "checkpoints" / "vae.pt")
    vae, source = vc.load_vae(str(run))
    assert vae.config.latent_channels == 2 and "step 7" in source
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert vc.roundtrip(vae, x).shape == x.shape and vc.roundtrip(vae, x).dtype == torch.uint8
