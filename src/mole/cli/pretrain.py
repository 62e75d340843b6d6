"""`mole pretrain`: train a small text-to-image base from scratch (how mole-tiny is made)."""

from __future__ import annotations

import argparse
import json

from ._common import finite_float


def register(sub: argparse._SubParsersAction) -> None:
    pre = sub.add_parser("pretrain", help="train a small text-to-image base from scratch (how mole-tiny is made)")
    pre.add_argument("--data", required=True, help="data root laid out like ../shared/data (faces/, hands/, scenes/)")
    pre.add_argument("--tokenizer", required=True, help="CLIP tokenizer folder (vocab.json, merges.txt)")
    pre.add_argument("--out", default="runs/mole-tiny")
    pre.add_argument("--steps", type=int, default=3200, help="UNet + text encoder steps (default: 3200)")
    pre.add_argument("--vae-steps", type=int, default=2400, help="VAE steps (default: 2400)")
    pre.add_argument("--latent-channels", type=int, default=8, help="VAE latent channels (default: 8; v1 had 4)")
    pre.add_argument("--vae-edge-weight", type=finite_float, default=1.0,
                     help="weight of the VAE's image-gradient L1 term (default: 1.0; 0 = v1's objective)")
    pre.add_argument("--batch-size", type=int, default=32)
    pre.add_argument("--checkpoint-every", type=int, default=250)
    pre.add_argument("--sample-every", type=int, default=1000)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    pre.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")
    pre.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ..pretrain.train import PretrainOptions, pretrain

    summary = pretrain(PretrainOptions(data=args.data, tokenizer=args.tokenizer, out=args.out, steps=args.steps,
                                       vae_steps=args.vae_steps, latent_channels=args.latent_channels,
                                       vae_edge_weight=args.vae_edge_weight, batch_size=args.batch_size, seed=args.seed,
                                       checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
                                       resume=args.resume, overwrite=args.overwrite))  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0
