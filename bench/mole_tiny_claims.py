"""The paper's claims, measured on mole-tiny (mean ± standard error over prompts/images × seeds).

    .venv/bin/python bench/mole_tiny_claims.py --build runs/mole-tiny-build --out runs/claims

--build is the folder `scripts/build_mole_tiny.py` worked in: it holds the held-out sets (base/data/*_test) and the
stage-3 files of every gating mode (stages/stage3-{both,local,global}). Writes claims.json, claims.md (the tables of
bench/RESULTS.md), fig7_global_gates.png, inspect/ (Fig. 7c local maps) and shipped_claims.json: the detection table
in the shape `mole demo` prints beside its quick look (copy it to src/mole/assets/mole_tiny/claims.json when the
assets are the ones measured). About 30 minutes on 2 CPU cores at the default 200 images per detection cell.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


@torch.no_grad()
def vae_roundtrip(model, images):
    import numpy as np
    from PIL import Image

    x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                     for im in images]) / 127.5 - 1  # fmt: skip
    vae = model.vae
    out = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    arr = ((out + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", required=True)
    p.add_argument("--base", default="mole-tiny")
    p.add_argument("--out", default="runs/claims")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--images", type=int, default=48, help="held-out images per set for the loss")
    p.add_argument("--det-seeds", type=int, default=25, help="seeds per prompt for the detection table (x 8 prompts "
                   "per kind: 200 images per cell)")  # fmt: skip
    args = p.parse_args(argv)
    from mole.eval.metrics import FaceHandDetector
    from mole.inference import InspectOptions, inspect
    from mole.inference.plot import line_chart
    from mole.measure import (
        FACE_TEST_PROMPTS,
        HAND_TEST_PROMPTS,
        Variant,
        apply_variant,
        detection_rates,
        fmt,
        generate_images,  # fmt: skip
        heldout_losses,
        mean_se,
        read_folder,
        separated,
        table,
    )
    from mole.models import DiffusionModel

    t0 = time.perf_counter()
    torch.manual_seed(0)
    build, out = Path(args.build), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    gates = {g: str(build / "stages" / f"stage3-{g}" / "final" / "mole.safetensors") for g in ("both", "local",
                                                                                             "global")}  # fmt: skip
    mole = gates["both"]
    V = {
        "base": Variant("base", "none"),
        "base+face": Variant("base+face", "fixed", mole, {"face": 1.0}),
        "base+hand": Variant("base+hand", "fixed", mole, {"hand": 1.0}),
        "fixed 1:1": Variant("fixed 1:1", "fixed", mole, {"face": 1.0, "hand": 1.0}),
        "MoLE": Variant("MoLE", "mole", mole),
        "MoLE local": Variant("MoLE local", "mole", gates["local"]),
        "MoLE global": Variant("MoLE global", "mole", gates["global"]),
    }
    model = DiffusionModel.from_pretrained(args.base)
    model.pipe.set_progress_bar_config(disable=True)
    results: dict = {"seeds": seeds, "steps": args.steps, "guidance_scale": args.guidance_scale}
    md = []

    # ---- 1. specialisation: held-out denoising loss
    sets = {k: read_folder(build / "base" / "data" / f"{k}_test", args.images) for k in ("face", "hand", "scene")}
    loss: dict = {}
    for name in ("base", "base+face", "base+hand", "fixed 1:1", "MoLE"):
        apply_variant(model, V[name])
        loss[name] = {k: heldout_losses(model, imgs, caps, seeds) for k, (imgs, caps) in sets.items()}
    results["heldout_loss"] = {n: {k: mean_se(v) for k, v in d.items()} for n, d in loss.items()}
    diff = {k: mean_se([m - b for m, b in zip(loss["MoLE"][k], loss["base"][k])]) for k in sets}
    results["heldout_loss_mole_minus_base"] = diff
    md.append("Held-out denoising loss (epsilon MSE, 5 fixed timesteps, fixed noise; lower is better; "
              f"{', '.join(f'{k}: {len(v[0])} images' for k, v in sets.items())} × {len(seeds)} seeds)\n")  # fmt: skip
    md.append(table(["model", "face close-ups", "hand close-ups", "scenes"],
                    [[n] + [fmt(results["heldout_loss"][n][k], 4) for k in sets] for n in loss]
                    + [["MoLE − base (paired)"] + [fmt(diff[k], 4) for k in sets]]))  # fmt: skip

    # ---- 2. Fig. 7a/b: global gates over the denoising steps, face vs hand prompts
    apply_variant(model, V["MoLE"])
    recorded = {}
    for kind, prompts in (("face", FACE_TEST_PROMPTS), ("hand", HAND_TEST_PROMPTS)):
        _, g = generate_images(model, prompts, seeds, args.steps, args.guidance_scale, record=True)
        recorded[kind] = g  # {expert: (steps, n)}
    names = ["face", "hand"]
    gate_tab = {kind: {e: mean_se(g[e].mean(0).tolist()) for e in names} for kind, g in recorded.items()}
    results["global_gate"] = gate_tab
    margins = {
        "face gate: face prompts − hand prompts": gate_tab["face"]["face"][0] - gate_tab["hand"]["face"][0],
        "hand gate: hand prompts − face prompts": gate_tab["hand"]["hand"][0] - gate_tab["face"]["hand"][0],
    }
    results["gate_margins"] = margins
    series, bands = {}, {}
    for kind, g in recorded.items():
        for e in names:
            series[f"{e} gate, {kind} prompts"] = g[e].mean(1).tolist()
            bands[f"{e} gate, {kind} prompts"] = g[e].std(1).tolist()
    results["global_gate_per_step"] = series
    line_chart(series, out / "fig7_global_gates.png", bands=bands, xlabel="denoising step",
               ylabel="global gate (mean over layers)", title="mole-tiny: global gates (Fig. 7a/b)")  # fmt: skip
    md.append(f"\nGlobal gates while generating held-out close-up prompts ({len(FACE_TEST_PROMPTS)} face, "
              f"{len(HAND_TEST_PROMPTS)} hand prompts × {len(seeds)} seeds, {args.steps} DDIM steps; mean over "
              "layers and steps)\n")  # fmt: skip
    md.append(table(["prompts", "face expert gate", "hand expert gate"],
                    [[k] + [fmt(gate_tab[k][e]) for e in names] for k in gate_tab]))  # fmt: skip
    md.append("\n" + "\n".join(f"- {k}: {v:+.3f} (target ≥ +0.05: {'met' if v >= 0.05 else 'not met'})"
                               for k, v in margins.items()))  # fmt: skip
    inspect(InspectOptions(base=args.base, mole=mole, prompts=[FACE_TEST_PROMPTS[1], HAND_TEST_PROMPTS[0]],
                           out_dir=str(out / "inspect"), steps=args.steps, guidance_scale=args.guidance_scale,
                           map_steps=5, seed=0))  # fmt: skip

    # ---- 3. detection (Tables 1-3 in small)
    det = FaceHandDetector()
    scene_prompts = sets["scene"][1][: len(FACE_TEST_PROMPTS)]  # as many as face / hand: the same n per cell
    prompt_sets = {"face": FACE_TEST_PROMPTS, "hand": HAND_TEST_PROMPTS, "scene": scene_prompts}
    detection: dict = {}
    for name in ("base", "fixed 1:1", "MoLE", "MoLE local", "MoLE global"):
        apply_variant(model, V[name])
        detection[name] = {}
        for kind, prompts in prompt_sets.items():
            imgs, _ = generate_images(model, prompts, list(range(args.det_seeds)), args.steps, args.guidance_scale)
            detection[name][kind] = detection_rates(det, imgs)
            if name in ("base", "MoLE"):
                from mole.inference.plot import grid

                grid(imgs[: 2 * len(prompts)][:16], cols=8).save(out / f"samples_{name.replace(' ', '_')}_{kind}.png")
    real = {"face": read_folder(build / "base" / "data" / "face_test")[0],
            "hand": read_folder(build / "base" / "data" / "hand_test", 100)[0],
            "scene": sets["scene"][0]}  # fmt: skip
    detection["real held-out (64 px)"] = {k: detection_rates(det, v) for k, v in real.items()}
    # what the model could draw at best: the same images through mole-tiny's own VAE (encode, decode)
    detection["real held-out through the VAE"] = {k: detection_rates(det, vae_roundtrip(model, v)) for k, v in
                                                  real.items()}  # fmt: skip
    results["detection"] = detection
    n_det = args.det_seeds
    md.append(f"\nDetection on generated images ({n_det} seeds per prompt: {n_det * len(FACE_TEST_PROMPTS)} images per "
              "face / hand cell; mediapipe; 64 px enlarged to 128 and framed by a 64 px grey "
              "border, see mole.measure.detector_view; rate = share of images with a "
              "detection ≥ 0.5; mean ± s.e. over prompts × seeds). The last row is real held-out images at 64 px: "
              "the face column on face images and the hand column on hand images are the detectors' ceiling; on "
              "the other kind they are the false-positive floor; the row through the VAE is what mole-tiny's "
              "decoder can show at best.\n")  # fmt: skip
    md.append(table(["model", "face prompts: face rate", "face conf", "hand prompts: hand rate", "hand conf",
                     "scene prompts: face rate", "scene: hand rate", "hand prompts: face rate (FP)",
                     "face prompts: hand rate (FP)"],
                    [[n, fmt(d["face"]["face_rate"], 2), fmt(d["face"]["face_conf"], 2), fmt(d["hand"]["hand_rate"], 2),
                      fmt(d["hand"]["hand_conf"], 2), fmt(d["scene"]["face_rate"], 2), fmt(d["scene"]["hand_rate"], 2),
                      fmt(d["hand"]["face_rate"], 2), fmt(d["face"]["hand_rate"], 2)]
                     for n, d in detection.items()]))  # fmt: skip
    checks = {
        "MoLE ≥ base on face rate (face prompts)":
            detection["MoLE"]["face"]["face_rate"][0] >= detection["base"]["face"]["face_rate"][0],
        "MoLE ≥ base on hand rate (hand prompts)":
            detection["MoLE"]["hand"]["hand_rate"][0] >= detection["base"]["hand"]["hand_rate"][0],
        "separated error bars (face)": separated(detection["MoLE"]["face"]["face_rate"],
                                                 detection["base"]["face"]["face_rate"]),
        "separated error bars (hand)": separated(detection["MoLE"]["hand"]["hand_rate"],
                                                 detection["base"]["hand"]["hand_rate"]),
    }  # fmt: skip
    results["detection_checks"] = checks
    md.append("\n" + "\n".join(f"- {k}: {'yes' if v else 'no'}" for k, v in checks.items()))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    n_cell = n_det * len(FACE_TEST_PROMPTS)
    shipped = {
        # the command, not this machine's folders: the file ships inside the package
        "source": "bench/mole_tiny_claims.py --build BUILD (BUILD: build_mole_tiny.py's --work; bench/RESULTS.md)",
        "date": time.strftime("%Y-%m-%d"),
        "images_per_cell": n_cell,
        "note": f"held-out prompts: {len(FACE_TEST_PROMPTS)} face, {len(HAND_TEST_PROMPTS)} hand, {len(scene_prompts)} "
                f"scene captions x {n_det} seeds; mediapipe rate at detection >= 0.5, mean and s.e.",
        "detection": {name: {kind: {metric: [round(v, 2) for v in detection[name][kind][metric]]}
                             for kind, metric in (("face", "face_rate"), ("hand", "hand_rate"), ("scene", "face_rate"))}
                      for name in ("base", "fixed 1:1", "MoLE")},
    }  # fmt: skip
    (out / "shipped_claims.json").write_text(json.dumps(shipped, indent=2) + "\n")
    (out / "claims.json").write_text(json.dumps(results, indent=2))
    (out / "claims.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
