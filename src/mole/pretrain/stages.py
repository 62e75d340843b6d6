"""The paper's stages 2 and 3 on a small base (mole-tiny by default): a face and a hand expert on the close-up sets,
then the gates on the mix, with the same `mole.training.train` loop users run.

    experts_and_gates(StageOptions(base="mole-tiny", face_dir=..., hand_dir=..., mix_dir=..., out_dir=...))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Gating
from ..training import DataConfig, ExpertTrainConfig, MixtureTrainConfig, OptimConfig, Stage, TrainConfig, train

logger = logging.getLogger(__name__)


@dataclass
class StageOptions:
    face_dir: str
    hand_dir: str
    mix_dir: str
    out_dir: str
    base: str = "mole-tiny"
    resolution: int = 64
    rank: int = 16
    expert_steps: int = 800
    expert_lr: float = 5e-4
    gate_steps: int = 500
    gate_lr: float = 3e-3
    batch_size: int = 16
    gatings: list[str] = field(default_factory=lambda: ["both"])  # one stage-3 run per gating mode
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("face_dir", "hand_dir", "mix_dir"):
            if not Path(getattr(self, name)).is_dir():
                raise FileNotFoundError(f"{name}={getattr(self, name)!r} is not a folder of captioned images")
        for name in ("rank", "expert_steps", "gate_steps", "batch_size", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: use a positive number")
        bad = [g for g in self.gatings if g not in ("local", "global", "both")]
        if bad or not self.gatings:
            raise ValueError(f"gatings={self.gatings}: use local, global and/or both")


def balanced_mix(sources: dict[str, str | Path], out: str | Path, per_source: int, seed: int = 0) -> Path:
    """A gate-training folder with `per_source` captioned images drawn (seeded) from each source folder, so that
    no kind dominates what the gates see. Files are copied with the source name as prefix."""
    import random
    import shutil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, folder in sources.items():
        images = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not images:
            raise FileNotFoundError(f"{folder}: no images for the {name!r} part of the mix")
        for p in rng.sample(images, min(per_source, len(images))):
            shutil.copyfile(p, out / f"{name}_{p.name}")
            if p.with_suffix(".txt").is_file():
                shutil.copyfile(p.with_suffix(".txt"), out / f"{name}_{p.stem}.txt")
    return out


def _cfg(o: StageOptions, stage: Stage, data: str, out: str, steps: int, lr: float, **kw) -> TrainConfig:
    return TrainConfig(
        stage=stage, model=o.base, output_dir=out, seed=o.seed, batch_size=o.batch_size, tensorboard=False,
        data=DataConfig(path=data, resolution=o.resolution, caption_dropout=0.1, cache_latents=True,
                        cache_text=True),
        max_steps=steps, optim=OptimConfig(lr=lr), log_every=50, checkpoint_every=10**9, **kw,
    )  # fmt: skip


def experts_and_gates(o: StageOptions) -> dict:
    """Train both experts and one gate set per gating mode; return the files and the probe losses."""
    out = Path(o.out_dir)
    result: dict = {"experts": {}, "gates": {}}
    files = {}
    for name, folder in (("face", o.face_dir), ("hand", o.hand_dir)):
        r = train(_cfg(o, Stage.EXPERT, folder, str(out / f"stage2-{name}"), o.expert_steps, o.expert_lr,
                       expert=ExpertTrainConfig(name=name, rank=o.rank)))  # fmt: skip
        files[name] = str(r.final[0])
        result["experts"][name] = {"file": files[name], "probe_loss_first": r.probe_loss_first,
                                   "probe_loss_last": r.probe_loss_last}  # fmt: skip
    for gating in o.gatings:
        r = train(_cfg(o, Stage.MIXTURE, o.mix_dir, str(out / f"stage3-{gating}"), o.gate_steps, o.gate_lr,
                       mixture=MixtureTrainConfig(experts=files, gating=Gating(gating))))  # fmt: skip
        result["gates"][gating] = {"file": str(r.final[0]), "probe_loss_first": r.probe_loss_first,
                                   "probe_loss_last": r.probe_loss_last,
                                   "gate_log_last": r.gate_log[-1] if r.gate_log else None}  # fmt: skip
    return result
