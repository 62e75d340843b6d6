"""Generation presets: sampling settings of reference implementations.

official: JiePKU/MoLE's generation scripts (gen_img_diffusers_moe.py, moe_sdxl_gen_img.py and their gen_command/*.sh):
DDIM, 50 steps, CFG 7.5, " best quality, 8K" appended to every prompt and " poor quality, unclear hand, bad face "
to every negative prompt (empty by default), and kohya's DDIM (scaled-linear betas 0.00085..0.012, clip_sample off,
diffusers' defaults otherwise: steps_offset 0, set_alpha_to_one True). The paper's own setting is the same
sampler, steps and CFG, without the prompt suffixes.
"""

from __future__ import annotations

GENERATE_PRESETS: dict[str, dict] = {
    "official": {
        "scheduler": "ddim",
        "steps": 50,
        "guidance_scale": 7.5,
        "prompt_suffix": " best quality, 8K",
        "negative_suffix": " poor quality, unclear hand, bad face ",
        "scheduler_config": {"clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
                             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},  # fmt: skip
    },
}


def generate_preset(name: str) -> dict:
    if name not in GENERATE_PRESETS:
        raise ValueError(f"preset={name!r} is unknown; use one of {', '.join(sorted(GENERATE_PRESETS))}")
    return dict(GENERATE_PRESETS[name])
