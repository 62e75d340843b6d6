"""Human-centric prompt benchmarks, built reproducibly from public prompt sets.

COCO Human Prompts: COCO captions about people (`mole.eval.human_text`: person words, body parts in the subject,
names of people; artist credits, "no people", "a couple of elephants", a bare "portrait" do not count).
DiffusionDB Human Prompts: DiffusionDB prompts about people that are not NSFW-flagged (every flag the record has is
read: prompt_nsfw and image_nsfw; any >= 0.5 drops it) and have none of the special symbols [ ] { } ( ) | < >
(weighting syntax, templates).
Measured on hand-labelled samples (tests/data/human_prompts_*_labelled.jsonl, bench/data_quality.py). COCO 2017 val
(25,014 captions) gives about 10.5k prompts; the paper's ~60k come from the larger COCO 2014 caption set.
Each benchmark is a jsonl of {"id", "prompt", "source", "source_id"} plus <name>.meta.json with its provenance
(source file and sha256, rules, counts, seed).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from .human_text import PERSON_WORDS, is_human_text

HUMAN_WORDS = PERSON_WORDS  # the person words of the rule (the old name, kept for callers)

SPECIAL_SYMBOLS = "[]{}()|<>"
_NSFW_KEYS = ("nsfw", "prompt_nsfw", "image_nsfw", "is_nsfw")


def has_human_word(text: str) -> bool:
    """True when `text` is about people (see mole.eval.human_text)."""
    return is_human_text(text)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_nsfw(record: dict, threshold: float = 0.5) -> bool:
    """Any NSFW flag of the record at or above `threshold` (booleans as 0 / 1); every flag is read."""
    for key in _NSFW_KEYS:
        value = record.get(key)
        if value is None:
            continue
        if (float(bool(value)) if isinstance(value, bool) else float(value)) >= threshold:
            return True
    return False


def _wrong_file(path: Path, kind: str, found: str) -> ValueError:
    other = "diffusiondb" if kind == "coco" else "coco"
    return ValueError(
        f"{path}: {found}, not a {kind} prompt source; give it to the {other} builder (`mole eval prompts {other} "
        f"{path.name} ...`) or pass a {kind} file"
    )


def _read_json(path: Path, kind: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{kind} prompt source {path} is not UTF-8 text (byte {exc.start})") from None
    except ValueError as exc:
        raise ValueError(f"{kind} prompt source {path} is not valid JSON ({exc})") from None


def coco_human_prompts(path: str | Path) -> tuple[list[dict], dict]:
    """(records, stats) from a COCO captions json ({"annotations": [{"id", "image_id", "caption"}]})."""
    path = Path(path)
    data = _read_json(path, "coco")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        found = "a list of prompt records" if isinstance(data, list) else "a JSON object without 'annotations'"
        raise _wrong_file(path, "coco", found)
    anns = data["annotations"]
    if anns and not all(isinstance(a, dict) and "caption" in a for a in anns[:100]):
        raise _wrong_file(path, "coco", "annotations without a 'caption'")
    out, seen = [], set()
    for a in anns:
        text = " ".join(str(a["caption"]).split())
        if has_human_word(text) and text.lower() not in seen:
            seen.add(text.lower())
            out.append({"prompt": text, "source": "coco", "source_id": a.get("id")})
    return out, {
        "source_records": len(anns),
        "kept": len(out),
        "dropped_no_human_word_or_duplicate": len(anns) - len(out),
    }


def diffusiondb_human_prompts(path: str | Path) -> tuple[list[dict], dict]:
    """(records, stats) from a DiffusionDB prompt list ([{"prompt"|"text": ..., optional NSFW flags}])."""
    path = Path(path)
    data = _read_json(path, "diffusiondb")
    if isinstance(data, dict):
        found = "COCO captions (a JSON object with 'annotations')" if "annotations" in data else "a JSON object"
        raise _wrong_file(path, "diffusiondb", found)
    if data and not any(isinstance(r, str) or (isinstance(r, dict) and ("prompt" in r or "text" in r))
                        for r in data[:100]):  # fmt: skip
        raise _wrong_file(path, "diffusiondb", "records with neither 'prompt' nor 'text'")
    stats = {"source_records": len(data), "dropped_nsfw": 0, "dropped_special_symbols": 0,
             "dropped_no_human_word": 0, "dropped_duplicate": 0, "has_nsfw_flag": False}  # fmt: skip
    out, seen = [], set()
    for i, rec in enumerate(data):
        rec = rec if isinstance(rec, dict) else {"prompt": rec}
        text = " ".join(str(rec.get("prompt", rec.get("text", ""))).split())
        if any(k in rec for k in _NSFW_KEYS):
            stats["has_nsfw_flag"] = True
        if _is_nsfw(rec):
            stats["dropped_nsfw"] += 1
        elif any(c in text for c in SPECIAL_SYMBOLS):
            stats["dropped_special_symbols"] += 1
        elif not has_human_word(text):
            stats["dropped_no_human_word"] += 1
        elif text.lower() in seen:
            stats["dropped_duplicate"] += 1
        else:
            seen.add(text.lower())
            out.append({"prompt": text, "source": "diffusiondb", "source_id": rec.get("image", i)})
    stats["kept"] = len(out)
    return out, stats


BUILDERS = {"coco": coco_human_prompts, "diffusiondb": diffusiondb_human_prompts}


def build_benchmark(kind: str, source: str | Path, out: str | Path, limit: int | None = None, seed: int = 0) -> Path:
    """Write <out> (jsonl) and <out>.meta.json; `limit` samples that many prompts with `seed` (None keeps all)."""
    if kind not in BUILDERS:
        raise ValueError(f"kind={kind!r}: use one of {', '.join(sorted(BUILDERS))}")
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"prompt source {source} does not exist")
    records, stats = BUILDERS[kind](source)
    if limit is not None and limit < len(records):
        records = random.Random(seed).sample(records, limit)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i, rec in enumerate(records):
            f.write(json.dumps({"id": i, **rec}) + "\n")
    meta = {
        "benchmark": f"{kind}-human-prompts", "source": str(source), "source_sha256": _sha256(source),
        "rules": {"human_text": "mole.eval.human_text (person words, body parts and names in the subject; "
                                "artist credits, negations, 'couple of <thing>' set aside)",
                  "human_words": list(PERSON_WORDS), "whole_word": True, "case_insensitive": True,
                  "special_symbols_dropped": SPECIAL_SYMBOLS if kind == "diffusiondb" else None,
                  "nsfw_keys_checked": list(_NSFW_KEYS) if kind == "diffusiondb" else None},
        "stats": stats, "limit": limit, "seed": seed, "count": len(records),
    }  # fmt: skip
    Path(str(out) + ".meta.json").write_text(json.dumps(meta, indent=2))
    return out


def read_benchmark(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {path} does not exist; build one with `mole eval prompts`")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"benchmark {path} is not UTF-8 text (byte {exc.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise ValueError(f"benchmark {path}:{n} is not valid JSON; build it with `mole eval prompts`") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise ValueError(f"benchmark {path}:{n} has no 'prompt' text; each line needs {{\"prompt\": ...}}")
        records.append(rec)
    return records
