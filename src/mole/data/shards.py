"""Training from webdataset tar shards (what `mole data --shard-size` writes), without listing a folder per rank.

    shards = open_shards("data/shards")                          # a folder with index.json (or *.tar files)
    shards = open_shards("data/shards/shard-{000000..000099}.tar")  # a brace pattern, a .tar file, an index.json
    shards[i]                                                    # a Sample whose image is read from its shard
    order = shards.epoch_order(seed, epoch)                      # this epoch's permutation of 0..len-1

A sample is the run of consecutive tar members sharing a key (the member name up to the first dot of its base
name, as webdataset reads it): an image (png, jpg, ...) and a caption (`.txt`, else the `caption` of `.json`).
Sample i of the shard set is sample i - offset[j] of shard j, offset[j] = the samples of shards 0..j-1; the counts
come from index.json (webdataset's wids shard index, written by `mole data`), so nothing is listed or scanned up
front; without an index each shard's headers are counted once.

The order of an epoch is local to shards: the shards in a permutation seeded by (seed, epoch), the samples of each
shard in a permutation seeded by (seed, epoch, shard). `StepBatchSampler` cuts that stream into per-step blocks (step
m, process p: positions m*B*P + p*B ... + B - 1) and the DataLoader hands batch k of a process to worker k mod W,
so every (process, worker) reads its own samples, all of them from the one or two shards the run is in, and each
sample is read once per epoch by one process. The resume position is the micro-step: the stream position
m*B*P is where a resumed run starts, exactly where the interrupted one stopped.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path

import torch

from .dataset import DataError, Sample

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
WIDS_KIND = "wids-shard-index-v1"
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key / extension split
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """'a-{000..002}.tar' -> a-000.tar, a-001.tar, a-002.tar (zero padding from the first bound); '{x,y}' ->
    x, y; several braces expand left to right (their product)."""
    parts, pos = [], 0
    for m in _BRACE.finditer(pattern):
        parts.append([pattern[pos : m.start()]])
        body = m.group(1)
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if rng:
            lo, hi = rng.group(1), rng.group(2)
            if int(hi) < int(lo):
                raise DataError(f"data.path={pattern!r}: the range {{{body}}} runs backwards; write {{{hi}..{lo}}}")
            parts.append([str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)])
        elif "," in body:
            parts.append(body.split(","))
        else:
            raise DataError(f"data.path={pattern!r}: {{{body}}} is neither a range {{000..009}} nor a list {{a,b}}")
        pos = m.end()
    parts.append([pattern[pos:]])
    return ["".join(p) for p in itertools.product(*parts)]


def is_shard_spec(path: str | os.PathLike) -> bool:
    """Whether data.path names shards: a .tar file, an index .json, a brace pattern, or a folder that holds
    index.json or .tar files directly (a build folder, with images/ and shards/, is read as an image folder)."""
    text = str(path)
    if "{" in text and "}" in text:
        return True
    p = Path(text)
    if p.suffix in (".tar", ".json") and p.is_file():
        return p.suffix == ".tar" or _is_index(p)
    if p.is_dir():
        if (p / INDEX_NAME).is_file() and _is_index(p / INDEX_NAME):
            return True
        return next(p.glob("*.tar"), None) is not None
    return False


def _is_index(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("shardlist"), list)


def write_index(shard_dir: Path, names: list[str], counts: list[int]) -> Path:
    """index.json in webdataset's wids format: {"shardlist": [{"url", "nsamples", "filesize"}]} (urls relative)."""
    index = {"__kind__": WIDS_KIND, "wids_version": 1, "name": shard_dir.name,
             "shardlist": [{"url": Path(n).name, "nsamples": c, "filesize": Path(n).stat().st_size}
                           for n, c in zip(names, counts)]}  # fmt: skip
    path = shard_dir / INDEX_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path)
    return path


def _read_index(path: Path) -> dict[str, int]:
    """{resolved shard path: samples} from a wids index (urls relative to the index's folder)."""
    try:
        data = json.loads(path.read_text())
        return {str((path.parent / e["url"]).resolve()): int(e["nsamples"]) for e in data["shardlist"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a shard index ({exc}); rewrite it with mole data --shard-size, or remove it "
                        "to count the shards' samples") from None  # fmt: skip


def tar_samples(tar: tarfile.TarFile, name: str) -> list[dict[str, tarfile.TarInfo]]:
    """The samples of an open tar in order: consecutive members sharing a key -> {extension: member}."""
    samples: list[dict[str, tarfile.TarInfo]] = []
    last = None
    for info in tar:
        if not info.isfile():
            continue
        m = _KEY.match(info.name)
        if m is None:
            continue
        key, ext = m.group(1), m.group(2).lower()
        if key != last:
            samples.append({"__key__": key})
            last = key
        samples[-1][ext] = info
    for s in samples:
        if not any(k in s for k in IMAGE_KEYS):
            raise DataError(f"shard {name}: sample {s['__key__']!r} has no image ({', '.join(IMAGE_KEYS[:3])}, ...)"
                            "; every sample needs one")  # fmt: skip
    return samples


class TarMember(io.BytesIO):
    """An image read from a shard: a file object for PIL, named shard.tar/key.ext in messages."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


class ShardSet:
    """The samples of a list of tar shards, indexed 0..len-1 in shard order; shards are opened when read (at most
    `keep_open` per process, a forked DataLoader worker opens its own)."""

    def __init__(self, paths: list[str], counts: list[int], spec: str = "", keep_open: int = 2) -> None:
        if not paths:
            raise DataError(f"data.path={spec!r} names no shard")
        self.paths, self.counts, self.spec, self.keep_open = list(paths), list(counts), spec, keep_open
        self.offsets = [0, *itertools.accumulate(self.counts)]
        self._open: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, position in the shard) of sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        import bisect

        j = bisect.bisect_right(self.offsets, index) - 1
        return j, index - self.offsets[j]

    def _shard(self, j: int):
        if self._pid != os.getpid():  # a forked worker: never share the parent's file offsets
            self._open, self._pid = OrderedDict(), os.getpid()
        if j in self._open:
            self._open.move_to_end(j)
            return self._open[j]
        path = self.paths[j]
        try:
            tar = tarfile.open(path, "r:")
            samples = tar_samples(tar, path)
        except (OSError, tarfile.TarError) as exc:
            raise DataError(f"shard {path} cannot be read ({exc}); rewrite it or leave it out of data.path") from None
        if len(samples) != self.counts[j]:
            tar.close()
            raise DataError(f"shard {path} holds {len(samples)} samples, its index says {self.counts[j]}; rewrite "
                            "index.json (mole data --shard-size) or remove it to count the samples")  # fmt: skip
        self._open[j] = (tar, samples)
        while len(self._open) > self.keep_open:
            self._open.popitem(last=False)[1][0].close()
        return self._open[j]

    def __getitem__(self, index: int) -> Sample:
        j, i = self.locate(index)
        tar, samples = self._shard(j)
        members = samples[i]
        ext = next(k for k in IMAGE_KEYS if k in members)
        name = f"{self.paths[j]}/{members['__key__']}.{ext}"
        caption = None
        if "txt" in members:
            caption = tar.extractfile(members["txt"]).read().decode("utf-8")
        elif "json" in members:
            caption = json.loads(tar.extractfile(members["json"]).read()).get("caption")
        if caption is None:
            raise DataError(f"shard {self.paths[j]}: sample {members['__key__']!r} has no caption (.txt, or "
                            "'caption' in .json)")  # fmt: skip
        return Sample(TarMember(tar.extractfile(members[ext]).read(), name), caption.strip())

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        """Epoch `epoch`'s permutation of the samples: shards in a seeded order, each shard's samples shuffled."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order: list[int] = []
        for j in torch.randperm(len(self.paths), generator=g).tolist():
            gj = torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_000_003 + j)
            order.extend(self.offsets[j] + i for i in torch.randperm(self.counts[j], generator=gj).tolist())
        return order


def open_shards(spec: str | os.PathLike) -> ShardSet:
    """The ShardSet data.path names: a folder of shards (its index.json; without one its *.tar files), a .tar file,
    an index .json, or a brace pattern (data/shard-{000000..000003}.tar). Counts come from an index.json beside the
    shards when it lists them all; otherwise each shard's tar headers are counted (once, on every process)."""
    text = str(spec)
    p = Path(text)
    index: dict[str, int] = {}
    if "{" in text:
        paths = expand_braces(text)
    elif p.is_dir():
        if (p / INDEX_NAME).is_file():
            index = _read_index(p / INDEX_NAME)
            paths = list(index)
        else:
            paths = sorted(str(x) for x in p.glob("*.tar"))
    elif p.suffix == ".json":
        index = _read_index(p)
        paths = list(index)
    else:
        paths = [text]
    missing = [x for x in paths if not Path(x).is_file()]
    if missing:
        raise DataError(f"data.path={text!r}: {len(missing)} of {len(paths)} shards do not exist (e.g. {missing[0]});"
                        " check the pattern or the folder")  # fmt: skip
    if not index:
        parents = {Path(x).resolve().parent for x in paths}
        if len(parents) == 1 and (next(iter(parents)) / INDEX_NAME).is_file():
            index = _read_index(next(iter(parents)) / INDEX_NAME)
    counts = [index.get(str(Path(x).resolve())) for x in paths]
    if any(c is None for c in counts):
        logger.info("counting the samples of %d shards (no index.json lists them)", sum(c is None for c in counts))
        for k, c in enumerate(counts):
            if c is None:
                try:
                    with tarfile.open(paths[k], "r:") as tar:
                        counts[k] = len(tar_samples(tar, paths[k]))
                except (OSError, tarfile.TarError) as exc:
                    raise DataError(f"shard {paths[k]} cannot be read ({exc})") from None
    shards = ShardSet(paths, counts, text)
    if len(shards) == 0:
        raise DataError(f"data.path={text!r}: the {len(paths)} shards hold no sample")
    logger.info("%d samples in %d shards (%s)", len(shards), len(paths), text)
    return shards


def open_training_data(path: str | os.PathLike, manifest: str | os.PathLike | None = None):
    """What training reads from data.path: a ShardSet when it names shards (is_shard_spec), else the captioned
    images of the folder (scan_samples). Either is indexed 0..len-1 and gives a Sample."""
    from .dataset import scan_samples

    if is_shard_spec(path):
        if manifest is not None:
            raise DataError(f"data.manifest={str(manifest)!r} with shards in data.path={str(path)!r}: shards carry "
                            "their captions; leave data.manifest unset")  # fmt: skip
        return open_shards(path)
    return scan_samples(path, manifest)
