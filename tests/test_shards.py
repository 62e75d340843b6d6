"""Training from webdataset shards: brace patterns, the split over processes and workers, the resume position,
and `mole train` on the shards `mole data --shard-size` writes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import HANDS
from mole.data import CaptionedImages, StepBatchSampler, collate
from mole.data.build import write_shards
from mole.data.dataset import DataError
from mole.data.shards import expand_braces, is_shard_spec, open_shards, open_training_data

N = 13  # samples: shards of 5, 5 and 3


def build(root: Path, n: int = N, shard_size: int = 5) -> Path:
    """A build folder as `mole data` leaves it (images/, manifest.jsonl) with n flat images whose grey level
    encodes their number, and its shards; returns the shards folder."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = f"images/src.v{i}_{i:02d}.png"  # a dot in the stem: webdataset keys end at the first dot
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(root / name)
        rows.append({"file": name, "caption": f"caption {i}"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_shards(root, shard_size)
    return root / "shards"


def number(item_pixels: torch.Tensor) -> int:
    """The sample number a flat image encodes (pixels in [-1, 1])."""
    return round(float((item_pixels.mean() + 1) * 127.5) / 10)


class WorkerImages(CaptionedImages):
    def __getitem__(self, key):
        item = super().__getitem__(key)
        info = torch.utils.data.get_worker_info()
        item["worker"] = info.id if info else 0
        return item


def collate_workers(items):
    out = collate(items)
    out["workers"] = [it["worker"] for it in items]
    return out


def stream(shards, rank, world, batch, workers, steps, start=0, seed=3):
    """(index, caption, number read from the pixels, worker) per sample of `steps` micro-steps of one process."""
    dataset = WorkerImages(shards, 8, seed=seed, caption_dropout=0.0)
    dataset[len(shards) - 1]  # the training loop's probe: this process opens a shard before the workers fork
    sampler = StepBatchSampler(len(dataset), batch, world, rank, seed, start=start, order=shards.epoch_order)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_workers,
                                         num_workers=workers)  # fmt: skip
    out = []
    for b in itertools.islice(loader, steps):
        out.append([(i, c, number(p), w) for i, c, p, w in zip(b["indices"], b["captions"], b["pixels"],
                                                                 b["workers"])])  # fmt: skip
    return out


def test_brace_patterns_and_what_names_shards(tmp_path):
    assert expand_braces("d/s-{000..002}.tar") == ["d/s-000.tar", "d/s-001.tar", "d/s-002.tar"]
    assert expand_braces("{a,b}-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "b-08.tar", "b-09.tar",
                                                  "b-10.tar"]  # fmt: skip
    with pytest.raises(DataError, match=r"\{3\.\.1\}"):
        expand_braces("s-{3..1}.tar")
    shard_dir = build(tmp_path / "b")
    assert sorted(p.name for p in shard_dir.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar",
                                                           "shard-000002.tar"]  # fmt: skip
    assert is_shard_spec(shard_dir) and is_shard_spec(shard_dir / "shard-000001.tar")
    assert is_shard_spec(f"{shard_dir}/shard-{{000000..000002}}.tar")
    assert not is_shard_spec(tmp_path / "b")  # the build folder: its images/ and .txt files, as before
    by_folder = open_shards(shard_dir)
    by_pattern = open_shards(f"{shard_dir}/shard-{{000000..000001}}.tar")
    assert by_folder.counts == [5, 5, 3] and by_pattern.counts == [5, 5] and len(by_pattern) == 10
    # without an index the shards' headers are counted: the same numbers
    (shard_dir / "index.json").unlink()
    assert open_shards(shard_dir).counts == [5, 5, 3]
    sample = by_folder[7]
    assert sample.caption == "caption 7" and "src.v7_07" not in str(sample.path)  # the key lost its dot
    with pytest.raises(DataError, match=r"2 of 4 shards do not exist.*shard-000003\.tar"):
        open_shards(f"{shard_dir}/shard-{{000001..000004}}.tar")
    with pytest.raises(DataError, match="data.manifest"):
        open_training_data(shard_dir, "m.jsonl")


def test_two_processes_two_workers_see_each_sample_once_per_epoch(tmp_path):
    shards = open_shards(build(tmp_path / "b", n=12))
    world, batch, workers = 2, 2, 2
    per_epoch = len(shards) // (world * batch)  # 3 micro-steps
    seen = {r: stream(shards, r, world, batch, workers, 2 * per_epoch) for r in range(world)}
    for epoch in range(2):
        got = [s for r in range(world) for b in seen[r][epoch * per_epoch : (epoch + 1) * per_epoch] for s in b]
        assert sorted(i for i, *_ in got) == list(range(12))  # each sample once, by one process
        assert all(c == f"caption {i}" and n == i for i, c, n, _ in got)  # the right members were read
    slots = {(r, w) for r in range(world) for b in seen[r] for *_, w in b}
    assert slots == {(0, 0), (0, 1), (1, 0), (1, 1)}  # every worker of every process read
    # the order is local to shards: an epoch reads its shards one after the other (3 runs for 3 shards)
    order = shards.epoch_order(3, 0)
    runs = sum(1 for k in range(len(order)) if k == 0 or shards.locate(order[k])[0] != shards.locate(order[k - 1])[0])
    assert sorted(order) == list(range(12)) and runs == 3 and order != shards.epoch_order(3, 1)


def test_resume_position_replays_the_same_samples(tmp_path):
    shards = open_shards(build(tmp_path / "b"))  # 13 samples: an epoch ends inside a micro-step
    whole = stream(shards, 1, 2, 2, 2, 8)
    resumed = stream(shards, 1, 2, 2, 2, 3, start=5)
    assert [[s[:3] for s in b] for b in resumed] == [[s[:3] for s in b] for b in whole[5:]]
    assert StepBatchSampler(13, 2, 2, 1, start=5).position(5) == 20  # micro-step 5 starts at sample 20


@pytest.mark.skipif(not HANDS, reason="shared hands missing")
def test_mole_train_reads_the_shards_mole_data_writes(tmp_path, tiny_sd15_dir, caplog):
    pytest.importorskip("mediapipe")
    from mole.cli import main

    src = tmp_path / "src"
    src.mkdir()
    for i, f in enumerate(HANDS[:6]):
        Image.open(f).save(src / f"hand{i}.jpg")
    assert main(["data", "closeups", str(src), str(tmp_path / "data"), "--part", "hand", "--size", "32",
                 "--shard-size", "2", "--workers", "1"]) == 0  # fmt: skip
    kept = len((tmp_path / "data" / "manifest.jsonl").read_text().splitlines())
    shard_dir = tmp_path / "data" / "shards"
    assert kept >= 4 and json.loads((shard_dir / "index.json").read_text())["shardlist"][0]["nsamples"] == 2
    out = tmp_path / "run"
    assert main(["train", "--preset", "stage2-hand", "--set", f"model='{tiny_sd15_dir}'", "--set",
                 f"data.path='{shard_dir}/shard-{{000000..000001}}.tar'", "--set", f"output_dir='{out}'",
                 "--set", "max_steps=3", "--set", "expert.rank=2", "--set", "expert.alpha=2", "--set",
                 "data.resolution=32", "--set", "tensorboard=false", "--set", "data.num_workers=2"]) == 0  # fmt: skip
    assert (out / "final" / "hand.safetensors").is_file()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3


def test_two_processes_train_on_each_shard_sample_once_per_epoch(tmp_path, tiny_sd15_dir):
    """torchrun, 2 processes (gloo on the CPU): one epoch of 8 samples in 4 steps of 2 x 1 image."""
    import os
    import subprocess
    import sys

    shard_dir = build(tmp_path / "b", n=8, shard_size=3)
    script = Path(__file__).parent / "scripts" / "mp_shards.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path / "run"), str(tiny_sd15_dir), f"{shard_dir}/shard-{{000000..000002}}.tar", "4"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((tmp_path / "run" / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert [len(s) for s in seen] == [4, 4]  # one batch per step on each process
    index = [[i for batch in s for i, epoch in batch if epoch == 0] for s in seen]
    assert sorted(index[0] + index[1]) == list(range(8)) and not set(index[0]) & set(index[1])



_INHERITED = {}


def _tar_id_in_child() -> int:
    shards = _INHERITED["shards"]  # the ShardSet the fork copied, with the parent's open shard
    keep = list(shards._open.values())  # alive: a new object cannot take its address  # noqa: F841
    return id(shards._shard(0)[0])


def test_a_forked_worker_opens_its_own_shards(tmp_path):
    """The parent (the loop's probe) has a shard open when DataLoader workers fork: a worker must not read through
    the parent's file object, whose offset the other workers share."""
    import multiprocessing

    shards = open_shards(build(tmp_path / "b"))
    assert shards[0].caption == "caption 0"
    parent = id(shards._shard(0)[0])
    assert id(shards._shard(0)[0]) == parent  # one process: the shard stays open
    _INHERITED["shards"] = shards
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:  # forked now: it inherits the open shard
            child = pool.apply(_tar_id_in_child)
    finally:
        _INHERITED.clear()
    assert child != parent
