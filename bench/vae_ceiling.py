"""The VAE ceiling: how much of what the face / hand detectors find on real held-out images survives mole-tiny's VAE.

    .venv/bin/python bench/vae_ceiling.py --vae runs/mole-tiny/base --data ../shared/data --out runs/vae_ceiling
    .venv/bin/python bench/vae_ceiling.py --vae mole-tiny --data ../shared/data       # the shipped model's VAE

Everything a generated image can show passes through the VAE's decoder, so a VAE that blurs faces caps every
detection figure of the claims bench. This script takes the held-out close-ups of the corpus (people and hands the
VAE never trained on, mole.pretrain.corpus's "test" split), runs the detectors on each image as is and after one
encode / decode (posterior mode), and reports per kind: the rate before, the rate after, the retained share
(after / before; target >= 0.80, issue #24) and the pixel / edge L1 of the round trip. --vae is a pretrain run folder
(its pipeline/vae, or, while the base still trains, checkpoints/vae.pt), a pipeline folder, or "mole-tiny".
Writes ceiling.json and ceiling.md. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def load_vae(spec: str):
    """The VAE of a pretrain run folder (finished or still training), of a pipeline folder, or of mole-tiny."""
    from diffusers import AutoencoderKL

    from mole.mole_tiny import ASSETS
    from mole.pretrain.model import build_vae

    root = ASSETS / "pipeline" if spec == "mole-tiny" else Path(spec)
    for folder in (root / "pipeline" / "vae", root / "vae"):
        if (folder / "config.json").is_file():
            return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval(), str(folder)
    ckpt = root / "checkpoints" / "vae.pt"
    if ckpt.is_file():
        opts = json.loads((root / "pretrain_options.json").read_text())
        vae = build_vae(opts.get("seed", 0), opts.get("latent_channels", 4))
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        vae.load_state_dict(state["vae"])
        return vae.eval(), f"{ckpt} (step {state['step']})"
    raise SystemExit(f"--vae {spec!r}: no pipeline/vae, vae/ or checkpoints/vae.pt there; pass a pretrain run folder, "
                     "a pipeline folder or mole-tiny")  # fmt: skip


def heldout_closeups(data: str, limit: int | None) -> dict[str, torch.Tensor]:
    """uint8 (n, 3, 64, 64) held-out crops per close-up kind."""
    from mole.pretrain.corpus import collect_corpus
    from mole.pretrain.train import load_images

    items = [i for i in collect_corpus(data) if i.split == "test" and i.kind in ("face", "hand")]
    out = {}
    for kind in ("face", "hand"):
        chosen = [i for i in items if i.kind == kind][:limit]
        out[kind] = load_images(chosen)[0]
    return out


@torch.no_grad()
def roundtrip(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """uint8 in, uint8 out: encode (posterior mode), decode, clamp, round."""
    outs = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].float() / 127.5 - 1  # (b, 3, 64, 64) in [-1, 1]
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        outs.append(((rec + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(outs)


def retained(after: tuple[float, float], before: tuple[float, float]) -> tuple[float, float]:
    """after / before with its standard error (first-order, the two rates treated as independent)."""
    if before[0] <= 0:
        return float("nan"), float("nan")
    r = after[0] / before[0]
    return r, r * math.sqrt((after[1] / max(after[0], 1e-12)) ** 2 + (before[1] / before[0]) ** 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True)
    p.add_argument("--data", required=True, help="data root laid out like ../shared/data")
    p.add_argument("--out", default="runs/vae_ceiling")
    p.add_argument("--limit", type=int, default=None, help="at most this many held-out images per kind")
    args = p.parse_args(argv)
    from PIL import Image

    from mole.eval.metrics import FaceHandDetector
    from mole.measure import detection_rates, fmt, mean_se, table
    from mole.pretrain.train import edge_l1

    vae, source = load_vae(args.vae)
    det = FaceHandDetector()
    res: dict = {"vae": source, "kinds": {}}
    for kind, imgs in heldout_closeups(args.data, args.limit).items():
        rec = roundtrip(vae, imgs)
        pil = lambda t: [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in t]  # noqa: E731
        before = detection_rates(det, pil(imgs))[f"{kind}_rate"]
        after = detection_rates(det, pil(rec))[f"{kind}_rate"]
        x, y = imgs.float() / 127.5 - 1, rec.float() / 127.5 - 1
        res["kinds"][kind] = {
            "n": len(imgs), "rate_before": before, "rate_after": after, "retained": retained(after, before),
            "l1": mean_se((y - x).abs().flatten(1).mean(1).tolist()),
            "edge_l1": mean_se([float(edge_l1(y[i : i + 1], x[i : i + 1])) for i in range(len(x))]),
        }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps(res, indent=2))
    rows = [[k, str(r["n"]), fmt(r["rate_before"], 2), fmt(r["rate_after"], 2), fmt(r["retained"], 2),
             "met" if r["retained"][0] >= 0.8 else "not met", fmt(r["l1"], 3), fmt(r["edge_l1"], 3)]
            for k, r in res["kinds"].items()]  # fmt: skip
    md = table(["held-out close-ups", "n", "detected as is", "after the VAE", "retained", "target ≥ 0.80",
                "pixel L1", "edge L1"], rows)  # fmt: skip
    (out / "ceiling.md").write_text(f"VAE: {source}\n\n{md}\n")
    sys.stdout.write(f"VAE: {source}\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
