"""What baking loses: held-out denoising loss of base / MoLE / face-prompt bake / hand-prompt bake on mole-tiny.

    .venv/bin/python bench/bake_loss.py --data ../shared/data --out runs/bake_loss

The held-out sets are mole-tiny's own (mole.pretrain.corpus: the test split of the face, hand and scene sources,
64 px crops, split by identity). A "face bake" takes its weights from the mean conditional global gates over the
face test prompts (`mole bake --from-prompts`), a "hand bake" from the hand test prompts; both are exact
(concatenated ranks) and loaded as plain LoRAs. Writes bake_loss.json and bake_loss.md (the table of RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def heldout_sets(data: str, per_set: int) -> dict[str, tuple[list, list[str]]]:
    from PIL import Image

    from mole.pretrain.corpus import collect_corpus
    from mole.pretrain.train import load_images

    items = [i for i in collect_corpus(data) if i.split == "test"]
    images, owner = load_images(items)
    sets: dict[str, tuple[list, list[str]]] = {k: ([], []) for k in ("face", "hand", "scene")}
    for n, (img, idx) in enumerate(zip(images, owner)):
        item = items[idx]
        imgs, caps = sets[item.kind]
        if len(imgs) < per_set:
            imgs.append(Image.fromarray(img.permute(1, 2, 0).numpy()))
            caps.append(item.captions[n % len(item.captions)])
    return sets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="runs/bake_loss")
    p.add_argument("--images", type=int, default=24, help="held-out images per set")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="denoising steps when recording the gates")
    p.add_argument("--ranks", default="4,8,16", help="also the face bake compressed to these ranks (--rank)")
    args = p.parse_args(argv)
    from mole.bake import bake_mole_file, gate_means
    from mole.inference.pipeline import load_loras, load_mole_weights
    from mole.measure import FACE_TEST_PROMPTS, HAND_TEST_PROMPTS, fmt, heldout_losses, mean_se, table
    from mole.models import DiffusionModel

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    model = DiffusionModel.from_pretrained("mole-tiny")
    model.pipe.set_progress_bar_config(disable=True)
    sets = heldout_sets(args.data, args.images)

    load_mole_weights(model.pipe, "mole-tiny", "mole")
    bakes, weights = {}, {}
    for kind, prompts in (("face", FACE_TEST_PROMPTS), ("hand", HAND_TEST_PROMPTS)):
        weights[kind] = gate_means(model.pipe, prompts, num_inference_steps=args.steps, guidance_scale=7.5,
                                   output_type="latent")  # fmt: skip
        bakes[kind] = out / f"{kind}_bake.safetensors"
        bake_mole_file("mole-tiny", bakes[kind], weights[kind], model=model.denoiser, overwrite=True)
    errors = {}
    for r in [int(x) for x in args.ranks.split(",") if x]:
        bakes[f"face-r{r}"] = out / f"face_bake_r{r}.safetensors"
        rep = bake_mole_file("mole-tiny", bakes[f"face-r{r}"], weights["face"], model=model.denoiser, rank=r,
                             overwrite=True)  # fmt: skip
        errors[f"face-r{r} bake"] = rep.relative_error
    loss: dict[str, dict[str, list[float]]] = {}
    for name in ("base", "MoLE", "face bake", "hand bake", *errors):
        if name == "base":
            load_mole_weights(model.pipe, "", "none")
        elif name == "MoLE":
            load_mole_weights(model.pipe, "mole-tiny", "mole")
        else:
            load_loras(model.pipe, {"baked": bakes[name.split()[0]]})
        with torch.no_grad():
            loss[name] = {k: heldout_losses(model, imgs, caps, seeds) for k, (imgs, caps) in sets.items()}
    summary = {n: {k: mean_se(v) for k, v in d.items()} for n, d in loss.items()}
    paired = {n: {k: mean_se([a - b for a, b in zip(loss[n][k], loss["MoLE"][k])]) for k in sets}
              for n in ("face bake", "hand bake")}  # fmt: skip
    paired |= {n: {k: mean_se([a - b for a, b in zip(loss[n][k], loss["face bake"][k])]) for k in sets}
               for n in errors}  # fmt: skip
    results = {"weights": weights, "svd_relative_error": errors, "heldout_loss": summary, "paired": paired,
               "seeds": seeds,
               "images": {k: len(v[0]) for k, v in sets.items()}, "seconds": time.perf_counter() - t0}  # fmt: skip
    md = [f"Held-out denoising loss (epsilon MSE, 5 fixed timesteps, fixed noise; lower is better; "
          f"{', '.join(f'{k}: {n} images' for k, n in results['images'].items())} x {len(seeds)} seeds). "
          "Bake weights (mean conditional global gates): "
          + "; ".join(f"{k} prompts: " + ", ".join(f"{e}={w:.3f}" for e, w in ws.items()) for k, ws in weights.items())
          + "\n"]  # fmt: skip
    md.append(table(["model", "face close-ups", "hand close-ups", "scenes"],
                    [[n] + [fmt(summary[n][k], 4) for k in sets] for n in loss]
                    + [[f"{n} − {'face bake' if n in errors else 'MoLE'} (paired)"]
                       + [fmt(paired[n][k], 4) for k in sets] for n in paired]))  # fmt: skip
    md.append("\nSVD relative Frobenius error of the face bake: "
              + ", ".join(f"{n.split()[0]}: {e:.3f}" for n, e in errors.items()))  # fmt: skip
    (out / "bake_loss.json").write_text(json.dumps(results, indent=2))
    (out / "bake_loss.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
