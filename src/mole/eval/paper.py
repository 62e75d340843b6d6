"""The paper's units and its own numbers, for reports that read side by side with Tables 1-3.

The paper reports HPS and ImageReward as percentages: column "HPS (%)" is 100 x the HPS score (the cosine of image
and text features that `hpsv2.score` returns; our `hps` metric) and "IR (%)" is 100 x the ImageReward score (our
`image_reward`). `paper_units` adds those columns to a summary, beside the raw scores.

`PAPER_RESULTS` holds only numbers taken from the paper, keyed by benchmark ("coco" / "diffusiondb", as
`mole eval prompts` names them) and the paper's row name. It is incomplete on purpose: only the COCO Human Prompts
rows of SD v1.5 and MoLE (SD v1.5) are recorded here; the other rows of Tables 1-3 (DiffusionDB Human Prompts, the
other baselines, the stage and gating ablations) are not, and are left out rather than guessed. The paper's figures
come from its own benchmark (~60k prompts from COCO 2014 captions, 3k sampled x 3 repeats) and its own HPS
checkpoint, so a run here matches them in protocol, not necessarily in prompts or metric version.
"""

from __future__ import annotations

import json
from pathlib import Path

# metric -> (the paper's column, factor from our raw score)
PAPER_UNITS: dict[str, tuple[str, float]] = {"hps": ("HPS (%)", 100.0), "image_reward": ("IR (%)", 100.0)}

# (benchmark, paper row) -> {paper column: value}
PAPER_RESULTS: dict[tuple[str, str], dict[str, float]] = {
    ("coco", "SD v1.5"): {"HPS (%)": 19.91, "IR (%)": 28.34},
    ("coco", "MoLE"): {"HPS (%)": 20.27, "IR (%)": 33.75},
}

BENCHMARK_NAMES = {"coco": "COCO Human Prompts", "diffusiondb": "DiffusionDB Human Prompts"}


def paper_units(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, se, ...}} of one model -> the paper's columns {"HPS (%)": {mean, se}, ...} for the metrics
    it has (mean and standard error scale by the same factor)."""
    out = {}
    for metric, (column, factor) in PAPER_UNITS.items():
        if metric in summary:
            s = summary[metric]
            out[column] = {"mean": factor * s["mean"], "se": factor * s["se"], "from": metric, "factor": factor}
    return out


def benchmark_kind(benchmark: str | Path) -> str | None:
    """"coco" / "diffusiondb" from the benchmark's .meta.json (written by `mole eval prompts`), else None."""
    meta = Path(str(benchmark) + ".meta.json")
    if not meta.is_file():
        return None
    try:
        name = json.loads(meta.read_text()).get("benchmark", "")
    except (json.JSONDecodeError, AttributeError):
        return None
    kind = str(name).removesuffix("-human-prompts")
    return kind if kind in BENCHMARK_NAMES else None


def paper_rows(kind: str | None) -> dict[str, dict[str, float]]:
    """The paper's rows {row name: {column: value}} for a benchmark kind (empty when none are recorded)."""
    return {row: values for (k, row), values in PAPER_RESULTS.items() if k == kind}
