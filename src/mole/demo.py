"""The main job on the embedded default: MoLE on mole-tiny, a small real model trained on real faces, hands and
scenes (see mole/assets/mole_tiny/MODEL_CARD.md), offline, in about a minute on a CPU.

1. (with `train=DATA`) stages 2 and 3 on mole-tiny from DATA/face, DATA/hand and DATA/mix: a face and a hand
   expert, then the gates;
2. check the foundation on the result: fused path == the literal per-expert formula, `remove_mole` restores the
   base bit for bit, the hand expert re-saved in kohya's format and loaded by name gives the same model;
3. generate face, hand and scene prompts with the base, the fixed 1:1 expert mix and MoLE side by side, recording
   the gates (MoLE) and running the face / hand detectors on every image;
4. Fig. 7: the gate curves and local maps of one face and one hand prompt;
5. a short table of what was measured (also summary.json, for machines).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PROMPTS = {  # in the style of mole-tiny's captions; bench/mole_tiny_claims.py measures held-out wordings
    "face": ["a close-up photo of a face", "a black and white close-up photo of a man's face",
             "a close-up portrait of a person's face"],
    "hand": ["a close-up photo of a hand showing two fingers", "a close-up photo of the palm of a woman's right hand",
             "a close-up photo of the back of a man's left hand"],
    "scene": ["a man riding a skateboard down the street", "a woman holding an umbrella in the rain",
              "a group of people standing on a beach"],
}  # fmt: skip
MODES = ("none", "fixed", "mole")
MODE_LABEL = {"none": "base", "fixed": "fixed 1:1", "mole": "MoLE"}


class DemoError(ValueError):
    """A demo option is invalid; the message names it and the fix."""


@dataclass
class DemoOptions:
    out_dir: Path = Path("runs/demo")
    base: str = "mole-tiny"
    mole: str = "mole-tiny"
    train: str | None = None  # a folder with face/, hand/ and mix/ captioned images: re-run stages 2 and 3
    train_steps: int = 300  # per expert and for the gates, with train
    rank: int = 16
    sample_steps: int = 25
    guidance_scale: float = 4.0
    seeds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        for name in ("train_steps", "rank", "sample_steps", "seeds"):
            if getattr(self, name) < 1:
                raise DemoError(f"{name}={getattr(self, name)}: use at least 1")
        if self.train is not None:
            missing = [k for k in ("face", "hand", "mix") if not (Path(self.train) / k).is_dir()]
            if missing:
                raise DemoError(f"train={self.train!r} lacks the folders {missing}: give a folder with face/, hand/ "
                                "and mix/ subfolders of captioned images (image + .txt)")  # fmt: skip


def _checks(model, mole_file: str, out: Path, seed: int) -> dict:
    """Foundation checks on the real model: fused == naive, removal exact, a kohya copy loads by name."""
    from .formats.lora import ExpertFormat, save_expert
    from .formats.mole_file import embedded_experts, read_mole_file
    from .inject import remove_mole, set_fused
    from .io import load_mole

    unet = model.denoiser
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(2, unet.config.in_channels, size, size - 4, generator=g)  # a non-square latent
    cond = model.encode_text([PROMPTS["face"][0], PROMPTS["hand"][0]])
    t = torch.tensor(500)
    manifest, tensors = read_mole_file(mole_file)
    experts = embedded_experts(manifest, tensors, mole_file, unet)
    kohya_hand = save_expert(experts["hand"], out / "hand_kohya.safetensors", ExpertFormat.KOHYA)
    from .formats.lora import load_expert

    with torch.no_grad():
        base_out = model.predict(sample, t, cond)
        load_mole(unet, mole_file)
        mole_out = model.predict(sample, t, cond)
        set_fused(unet, False)
        naive_out = model.predict(sample, t, cond)
        set_fused(unet, True)
        remove_mole(unet)
        restored = torch.equal(model.predict(sample, t, cond), base_out)
        load_mole(unet, mole_file, experts=[load_expert(kohya_hand, "hand"), experts["face"]])
        kohya_out = model.predict(sample, t, cond)
        remove_mole(unet)
    return {
        "wrapped_layers": len(manifest["layers"]),
        "max_abs_change_vs_base": float((mole_out - base_out).abs().max()),
        "max_abs_fused_vs_naive": float((mole_out - naive_out).abs().max()),
        "max_abs_kohya_hand_vs_embedded_hand": float((kohya_out - mole_out).abs().max()),
        "remove_restores_base_exactly": restored,
    }


def run_demo(opts: DemoOptions) -> dict:
    """Run the demo; return a JSON-ready summary (also written to out_dir/summary.json)."""
    from .eval.metrics import FaceHandDetector, MetricUnavailable
    from .inference import InspectOptions, inspect
    from .inference.pipeline import MixMode, load_mole_weights
    from .inference.plot import grid
    from .measure import detection_rates, generate_images, mean_se
    from .models import DiffusionModel

    t0 = time.perf_counter()
    out = opts.out_dir
    out.mkdir(parents=True, exist_ok=True)
    mole_file = opts.mole
    trained = None
    if opts.train is not None:
        from .pretrain.stages import StageOptions, experts_and_gates

        data = Path(opts.train)
        trained = experts_and_gates(StageOptions(
            base=opts.base, face_dir=str(data / "face"), hand_dir=str(data / "hand"), mix_dir=str(data / "mix"),
            out_dir=str(out / "train"), rank=opts.rank, expert_steps=opts.train_steps, gate_steps=opts.train_steps,
            seed=opts.seed,
        ))  # fmt: skip
        mole_file = trained["gates"]["both"]["file"]
    from .formats.mole_file import read_mole_manifest

    read_mole_manifest(mole_file)  # a wrong file fails here, before the pipeline loads
    model = DiffusionModel.from_pretrained(opts.base)
    model.pipe.set_progress_bar_config(disable=True)
    checks = _checks(model, mole_file, out, opts.seed)

    try:
        detector = FaceHandDetector()
    except MetricUnavailable as exc:  # the demo still runs without mediapipe; the table says so
        logger.warning("%s", exc)
        detector = None
    seeds = list(range(opts.seed, opts.seed + opts.seeds))
    images: dict = {}
    gates: dict = {}
    detect: dict = {}
    for mode in MODES:
        load_mole_weights(model.pipe, mole_file, MixMode(mode))
        for kind, prompts in PROMPTS.items():
            imgs, g = generate_images(model, prompts, seeds, opts.sample_steps, opts.guidance_scale,
                                      record=mode == "mole")  # fmt: skip
            images[(mode, kind)] = imgs
            if g is not None:
                gates[kind] = {n: mean_se(v.mean(0).tolist()) for n, v in g.items()}  # per sample, over steps
            if detector is not None:
                detect[(mode, kind)] = detection_rates(detector, imgs)
    load_mole_weights(model.pipe, mole_file, MixMode.NONE)
    # side by side: one row per (kind, prompt) at the first seed, columns base | fixed | MoLE
    cells, labels, rows = [], [], []
    for kind, prompts in PROMPTS.items():
        for k, p in enumerate(prompts):
            rows.append(f'{kind}: "{p}" (seed {seeds[0]})')
            for mode in MODES:
                cells.append(images[(mode, kind)][k])
                labels.append(MODE_LABEL[mode])
    compare = out / "compare.png"
    grid(cells, cols=len(MODES), labels=labels, row_labels=rows, min_cell=160).save(compare)
    for (mode, kind), imgs in images.items():
        folder = out / "images" / MODE_LABEL[mode].replace(" ", "_").replace(":", "")
        folder.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(imgs):
            im.save(folder / f"{kind}_{i:02d}.png")
    inspect(InspectOptions(base=opts.base, mole=mole_file, prompts=[PROMPTS["face"][0], PROMPTS["hand"][0]],
                           out_dir=str(out / "inspect"), steps=opts.sample_steps, guidance_scale=opts.guidance_scale,
                           map_steps=4, seed=opts.seed))  # fmt: skip

    summary = {
        "base": opts.base,
        "mole": opts.mole if opts.train is None else mole_file,
        "trained": trained,
        "checks": checks,
        "prompts": PROMPTS,
        "seeds": seeds,
        "global_gate": {kind: {n: {"mean": m, "se": s} for n, (m, s) in d.items()} for kind, d in gates.items()},
        "detection": {f"{MODE_LABEL[mode]}/{kind}": {k: {"mean": m, "se": s} for k, (m, s) in d.items()}
                      for (mode, kind), d in detect.items()} if detector else None,  # fmt: skip
        "bench": shipped_bench() if opts.mole == "mole-tiny" and opts.train is None else None,
        "files": {"compare": str(compare), "inspect": str(out / "inspect"), "images": str(out / "images")},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _verdict(mole: dict, base: dict) -> str:
    """What a pair of error bars supports: a difference only when they do not overlap."""
    from .measure import separated

    a, b = (mole["mean"], mole["se"]), (base["mean"], base["se"])
    if separated(a, b):
        return "higher (error bars apart)"
    if separated(b, a):
        return "lower (error bars apart)"
    return "no difference shown at this n"


_RATE_ROWS = (("face", "face_rate", "face found on face prompts"), ("hand", "hand_rate", "hand found on hand prompts"),
              ("scene", "face_rate", "face found on scene prompts"))  # fmt: skip


def _rate_rows(cell) -> list[str]:
    """One line per detection row: mean ± s.e. per mode, and what MoLE vs base supports; cell(mode, kind, metric)."""
    lines = []
    for kind, metric, label in _RATE_ROWS:
        cells = {m: cell(m, kind, metric) for m in MODES}
        lines.append(f"  {label:<30}" + "".join(f"{c['mean']:>8.2f} ± {c['se']:.2f}" for c in cells.values())
                     + f"   {_verdict(cells['mole'], cells['none'])}")  # fmt: skip
    return lines


def shipped_bench() -> dict | None:
    """The detection table measured by bench/mole_tiny_claims.py for the shipped mole-tiny (date and n with it)."""
    from .mole_tiny import ASSETS

    path = ASSETS / "claims.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summary_table(summary: dict) -> str:
    """The demo's closing table, from the measured summary."""
    lines = [f"mole demo: {summary['base']} + {summary['mole']}  ({summary['seconds']:.0f} s)", ""]
    gates = summary["global_gate"]
    if gates:
        experts = list(next(iter(gates.values())))
        lines.append("MoLE global gates (mean ± s.e. over images; each image averaged over layers and steps):")
        lines.append("  prompts  " + "".join(f"{e + ' expert':>18}" for e in experts))
        for kind, d in gates.items():
            lines.append(f"  {kind:<8} " + "".join(f"{d[e]['mean']:>10.3f} ± {d[e]['se']:.3f}" for e in experts))
        lines.append("")
    det = summary["detection"]
    if det:
        n = len(summary["seeds"]) * len(next(iter(summary["prompts"].values())))
        lines.append(f"Quick look: detected (share of n={n} images per cell, mean ± s.e.; mediapipe):")
        lines.append(f"  {'':<30}" + "".join(f"{MODE_LABEL[m]:>15}" for m in MODES) + "   MoLE vs base")
        lines += _rate_rows(lambda mode, kind, metric: det[f"{MODE_LABEL[mode]}/{kind}"][metric])
        lines.append("")
    else:
        lines.append("Detection skipped: mediapipe is not installed (see scripts/install.sh).\n")
    bench = summary.get("bench")
    if bench:
        lines.append(f"Measured ({bench['date']}, n={bench['images_per_cell']} images per cell, held-out prompts; "
                     "bench/mole_tiny_claims.py):")  # fmt: skip
        lines += _rate_rows(lambda mode, kind, metric: dict(zip(("mean", "se"),
                                                                bench["detection"][MODE_LABEL[mode]][kind][metric])))
        lines.append("")
    c = summary["checks"]
    lines.append(f"Checks: fused vs naive max |diff| {c['max_abs_fused_vs_naive']:.1e}, kohya copy vs embedded "
                 f"{c['max_abs_kohya_hand_vs_embedded_hand']:.1e}, removal exact: {c['remove_restores_base_exactly']}"
                 f", {c['wrapped_layers']} wrapped layers")  # fmt: skip
    f = summary["files"]
    lines.append(f"Pictures: {f['compare']} (base | fixed | MoLE), {f['inspect']}/ (Fig. 7), {f['images']}/")
    return "\n".join(lines)
