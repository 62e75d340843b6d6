"""`mole data ... --shard i/n` and `mole data merge`: a build split over machines equals the one-process build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import FACES
from mole.cli import main

pytest.importorskip("mediapipe")
from mole.data.build import BuildOptions, build_dataset, merge_builds, source_part  # noqa: E402

PARTS = 3


def sources(root: Path) -> Path:
    """Five ORL faces and a resized copy of the first (a near-duplicate), the copy in another part than it."""
    root.mkdir()
    for i, f in enumerate(FACES[:5]):
        Image.open(f).convert("RGB").save(root / f"face{i}.png")
    name = next(f"copy{k}.png" for k in range(100) if source_part(f"copy{k}.png", PARTS) != source_part("face0.png",
                                                                                                      PARTS))
    Image.open(FACES[0]).convert("RGB").resize((138, 168)).save(root / name)
    return root


def rows(build: Path) -> list[dict]:
    return [json.loads(x) for x in (build / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.skipif(len(FACES) < 5, reason="shared faces missing")
def test_merged_parts_equal_the_one_process_build(tmp_path):
    src = sources(tmp_path / "src")
    kw = dict(source=str(src), mode="closeups", part="face", size=64, workers=1, tokenizer="none")
    whole = build_dataset(BuildOptions(out_dir=str(tmp_path / "whole"), **kw))
    parts = [tmp_path / f"part{i}" for i in range(PARTS)]
    for i, p in enumerate(parts):
        build_dataset(BuildOptions(out_dir=str(p), shard=f"{i}/{PARTS}", **kw))
    per_part = [[json.loads(x)["source"] for x in (p / "sources.jsonl").read_text().splitlines()] for p in parts]
    assert sorted(sum(per_part, [])) == sorted(str(x) for x in src.iterdir())  # each source in exactly one part
    assert sum(1 for x in per_part if x) >= 2  # the split is not trivial
    assert main(["data", "merge", *map(str, parts[::-1]), "--out", str(tmp_path / "merged"), "--shard-size",
                 "2"]) == 0  # fmt: skip
    merged = json.loads((tmp_path / "merged" / "stats.json").read_text())
    assert whole["kept"] >= 4 and whole["crops_dropped"].get("duplicate", 0) == 1  # the copy, dropped across parts
    assert rows(tmp_path / "merged") == rows(tmp_path / "whole")
    one = json.loads((tmp_path / "whole" / "stats.json").read_text())
    strip = ("seconds", "options")
    assert {k: v for k, v in merged.items() if k not in strip} == {k: v for k, v in one.items() if k not in strip}
    assert {**merged["options"], "out_dir": "", "shard_size": 0} == {**one["options"], "out_dir": ""}
    for r in rows(tmp_path / "merged"):
        assert (tmp_path / "merged" / r["file"]).read_bytes() == (tmp_path / "whole" / r["file"]).read_bytes()
    assert (tmp_path / "merged" / "shards" / "index.json").is_file()
    # a rerun of the merged folder with the build's options resumes it: nothing is processed again
    again = build_dataset(BuildOptions(out_dir=str(tmp_path / "merged"), **kw))
    assert again["sources"] == one["sources"] and rows(tmp_path / "merged") == rows(tmp_path / "whole")
    with pytest.raises(ValueError, match=r"parts 1/3 missing \(given 0/3, 2/3\)"):
        merge_builds([parts[0], parts[2]], tmp_path / "m2")


def test_bad_parts_are_refused_naming_the_value(tmp_path, caplog):
    (tmp_path / "src").mkdir()
    for bad in ("3/3", "1/0", "a/b", "-1/2", "2"):
        with pytest.raises(ValueError, match=f"shard={bad!r}"):
            BuildOptions(source=str(tmp_path / "src"), out_dir=str(tmp_path / "o"), shard=bad)
    assert main(["data", "closeups", str(tmp_path / "src"), str(tmp_path / "o"), "--shard", "4/4"]) == 2
    assert "shard='4/4'" in caplog.text and len(caplog.records[-1].getMessage().splitlines()) == 1
    shares = [source_part(f"img{k}.jpg", 4) for k in range(4000)]
    assert all(900 < shares.count(i) < 1100 for i in range(4))  # the hash spreads sources evenly
