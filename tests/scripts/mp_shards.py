"""Run under torchrun: train stage 2 from webdataset shards and write the sample indices this process trained on."""

import json
import os
import sys

import mole.training.loop as loop
from mole.data import StepBatchSampler
from mole.training import load_config, train

out, model, data, steps = sys.argv[1:5]
seen = []


class Recording(StepBatchSampler):
    def __iter__(self):  # the batches the DataLoader takes (the probe reads sampler.batch() directly)
        for keys in super().__iter__():
            seen.append([list(k) for k in keys])
            yield keys


loop.StepBatchSampler = Recording
cfg = load_config(preset="stage2-face", overrides=[
    f"model='{model}'", f"data.path='{data}'", f"output_dir='{out}'", f"max_steps={steps}", "expert.rank=2",
    "expert.alpha=2", "data.resolution=32", "tensorboard=false", "batch_size=1", "total_batch_size=2",
])  # fmt: skip
train(cfg)
with open(os.path.join(out, f"seen{os.environ.get('RANK', '0')}.json"), "w") as f:
    json.dump(seen, f)
