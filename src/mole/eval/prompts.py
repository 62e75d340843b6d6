"""Human-centric prompt benchmarks, built reproducibly from public prompt sets.

COCO Human Prompts: COCO captions that contain a human word (whole-word, case-insensitive; list below).
DiffusionDB Human Prompts: DiffusionDB prompts that contain a human word, are not NSFW-flagged (when the source has
the flag) and have none of the special symbols [ ] { } ( ) | < > (weighting syntax, templates).
Each benchmark is a jsonl of {"id", "prompt", "source", "source_id"} plus <name>.meta.json with its provenance
(source file and sha256, rules, counts, seed).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

HUMAN_WORDS = (
    "man", "men", "woman", "women", "person", "persons", "people", "boy", "boys", "girl", "girls", "kid", "kids",
    "child", "children", "teenager", "teenagers", "teen", "teens", "baby", "babies", "toddler", "toddlers", "adult",
    "adults", "guy", "guys", "lady", "ladies", "gentleman", "gentlemen", "player", "players", "skier", "skiers",
    "surfer", "surfers", "skateboarder", "skateboarders", "snowboarder", "snowboarders", "rider", "riders", "father",
    "mother", "dad", "mom", "son", "daughter", "brother", "sister", "husband", "wife", "bride", "groom", "couple",
    "family", "friends", "crowd", "human", "humans", "portrait", "face", "faces", "hand", "hands", "pedestrian",
    "pedestrians", "worker", "workers", "chef", "doctor", "nurse", "soldier", "soldiers", "police", "policeman",
    "officer", "student", "students", "athlete", "athletes", "model", "actor", "actress", "king", "queen", "prince",
    "princess", "warrior", "knight", "businessman", "businesswoman",
)  # fmt: skip
_HUMAN = re.compile(r"\b(" + "|".join(HUMAN_WORDS) + r")\b", re.IGNORECASE)
SPECIAL_SYMBOLS = "[]{}()|<>"
_NSFW_KEYS = ("nsfw", "prompt_nsfw", "image_nsfw", "is_nsfw")


def has_human_word(text: str) -> bool:
    return _HUMAN.search(text) is not None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_nsfw(record: dict) -> bool:
    for key in _NSFW_KEYS:
        if key in record:
            value = record[key]
            return bool(value) if isinstance(value, bool) else float(value) >= 0.5
    return False


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
    anns = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(anns, list) or not all(isinstance(a, dict) and "caption" in a for a in anns):
        raise ValueError(f"{path} is not a COCO captions file (an 'annotations' list of {{'caption': ...}}); for a "
                         "DiffusionDB prompt list use `mole eval prompts diffusiondb`")  # fmt: skip
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
    if not isinstance(data, list):
        raise ValueError(f"{path} is not a DiffusionDB prompt list (a JSON list of prompts or {{'prompt': ...}}); "
                         "for COCO captions use `mole eval prompts coco`")  # fmt: skip
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
        raise ValueError(f"kind={kind!r}: use one of {sorted(BUILDERS)}")
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
        "rules": {"human_words": list(HUMAN_WORDS), "whole_word": True, "case_insensitive": True,
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
