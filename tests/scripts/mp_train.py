"""Run under torchrun: train stage 2 for a few steps and write this process's trainable checksum."""

import json
import os
import sys

from mole.training import load_config, train

out, model, data = sys.argv[1:4]
cfg = load_config(preset="stage2-face", overrides=[
    f"model='{model}'", f"data.path='{data}'", f"output_dir='{out}'", "max_steps=4", "expert.rank=4",
    "data.resolution=32", "optim.lr=1e-3", "tensorboard=false", "batch_size=1",
    "total_batch_size=2", "expert.alpha=4",
])  # fmt: skip
result = train(cfg)
rank = os.environ.get("RANK", "0")
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(
        {"checksum": result.trainable_checksum, "losses": result.losses, "world": os.environ.get("WORLD_SIZE"),
         "batch": result.batch}, f
    )
