"""bench/instruct_claim.py's measurements, against literal formulas written here (not the script's helpers)."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "bench" / "instruct_claim.py"
_spec = importlib.util.spec_from_file_location("instruct_claim", _PATH)
ic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ic)


def test_psnr_uses_the_peak_of_images_in_minus_one_to_one():
    a = torch.rand(2, 3, 32, 32) * 1.6 - 0.8
    b = a + 0.1  # mse 0.01 on a range of width 2: 10 log10(2^2 / 0.01) = 26.02 dB (peak 1 would give 20.0)
    assert ic.psnr(b, a).tolist() == pytest.approx([10 * math.log10(4 / 0.01)] * 2, abs=1e-3)


def test_ssim_equals_the_literal_formula_on_one_gaussian_window():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 3, 7, 7, generator=g) * 2 - 1, torch.rand(1, 3, 7, 7, generator=g) * 2 - 1
    x = np.arange(7) - 3.0
    w1 = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(w1, w1) / np.outer(w1, w1).sum()
    vals = []
    for c in range(3):  # one 7x7 window per channel: the whole image
        p, q = (a[0, c].numpy().astype(np.float64) + 1) / 2, (b[0, c].numpy().astype(np.float64) + 1) / 2
        mp, mq = (w * p).sum(), (w * q).sum()
        vp, vq, cov = (w * p * p).sum() - mp**2, (w * q * q).sum() - mq**2, (w * p * q).sum() - mp * mq
        c1, c2 = 0.01**2, 0.03**2
        vals.append((2 * mp * mq + c1) * (2 * cov + c2) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    assert float(ic.ssim(a, b)[0]) == pytest.approx(float(np.mean(vals)), abs=1e-5)
    assert float(ic.ssim(a, a)[0]) == pytest.approx(1.0, abs=1e-5)


def test_the_conditions_are_grey_blurred_and_edges_of_the_target():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    grey = ic.condition("colorize", x)
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(grey, lum[:, None].expand(-1, 3, -1, -1), atol=1e-6)
    flat = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(ic.condition("deblur", flat), flat, atol=1e-6)  # a blur keeps a flat image
    assert ic.condition("deblur", x).std() < 0.6 * x.std()  # and smooths noise
    assert torch.all(ic.condition("edges", flat) == -1)  # no edge on a flat image
    step = torch.full((1, 3, 32, 32), -1.0)
    step[..., 16:] = 1.0
    e = ic.condition("edges", step)[0, 0]
    assert torch.all(e[:, 15:17] == 1) and torch.all(e[:, :14] == -1)  # the vertical edge, and only it


def test_tokens_are_four_by_four_patches_in_raster_order():
    x = torch.arange(3 * 32 * 32, dtype=torch.float32).view(1, 3, 32, 32)
    t = ic.patchify(x)
    assert t.shape == (1, 64, 48)
    assert torch.equal(t[0, 1], x[0, :, 0:4, 4:8].reshape(-1))  # token 1: row 0, second patch; channels first
    assert torch.equal(t[0, 8], x[0, :, 4:8, 0:4].reshape(-1))
    assert torch.equal(ic.unpatchify(t), x)


def test_the_validation_split_is_disjoint_from_the_reported_test_images():
    test, val = ic.held_split(476, 96, "test"), ic.held_split(476, 96, "val")
    assert len(test) == len(val) == 96 and not set(test.tolist()) & set(val.tolist())
    # test is the selection the reported table used: the first 96 of a seed-0 permutation
    assert test.tolist() == torch.randperm(476, generator=torch.Generator().manual_seed(0))[:96].tolist()
    with pytest.raises(ValueError, match="--held 300: val needs 600"):
        ic.held_split(476, 300, "val")


def test_a_rerun_with_other_settings_is_refused_before_any_work(tmp_path, capsys):
    import json

    (tmp_path / "results.json").write_text(json.dumps({"config": {"steps": 600, "lr": 1e-3}}))
    with pytest.raises(SystemExit) as e:
        ic.main(["--out", str(tmp_path), "--steps", "1500"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "steps: 600 there, 1500 now" in err and "pass a new --out" in err
    assert not (tmp_path / "log.txt").exists()  # refused before it wrote anything


@pytest.mark.parametrize("item, says", [("loraa=1e-3", "the method must be one of"), ("lora=fast", "not a number"),
                                        ("lora=-1", "positive"), ("lora=0", "positive"),
                                        ("lora=nan", "not a finite number")])  # fmt: skip
def test_bad_method_learning_rates_are_refused_with_the_value(tmp_path, capsys, item, says):
    with pytest.raises(SystemExit):
        ic.main(["--out", str(tmp_path), "--method-lr", item])
    err = capsys.readouterr().err
    assert item in err and says in err
    assert not (tmp_path / "log.txt").exists()


@pytest.mark.parametrize("value, says", [("nan", "not a finite number"), ("inf", "not a finite number"),
                                         ("0", "positive"), ("-1e-3", "positive")])  # fmt: skip
def test_a_bad_shared_learning_rate_is_refused_with_the_value(tmp_path, capsys, value, says):
    with pytest.raises(SystemExit) as e:
        ic.main(["--out", str(tmp_path), f"--lr={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert repr(value) in err and says in err
    assert not (tmp_path / "log.txt").exists()


def test_the_paired_table_gives_the_s_e_across_training_seeds_and_pairs_only_common_seeds():
    def run(value: float) -> dict:
        return {t: {"psnr": [value, value], "ssim": [0.5, 0.5]} for t in ic.TASKS}

    # instruct-moe leads lora by 1 dB on seed 0 and ties on seed 1; lora's seed 2 has no instruct-moe partner
    results = {"params": {}, "lora/s0": run(10.0), "lora/s1": run(10.0), "lora/s2": run(30.0),
               "instruct-moe/s0": run(11.0), "instruct-moe/s1": run(10.0)}  # fmt: skip
    row = next(r for r in ic.table(results).splitlines() if r.startswith("| instruct-moe - lora"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # pooled over 2 seeds x 2 (image, sampling) pairs: diffs 1, 1, 0, 0 -> 0.50 +- 0.577 / 2
    assert cells[4] == "+0.50 ± 0.29"
    # per training seed: 1 and 0 -> 0.50 +- 0.707 / sqrt(2)
    assert cells[6] == "+0.50 ± 0.50 (n = 2)"
    assert not any(r.startswith("| instruct-moe - token-moe") for r in ic.table(results).splitlines())
