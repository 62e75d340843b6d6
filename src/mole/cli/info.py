"""`mole info`: a short summary of a MoLE file (--json: the full manifest)."""

from __future__ import annotations

import argparse
import json

from ._common import check_file


def register(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="a short summary of a MoLE .safetensors file (--json: the full manifest)")
    info.add_argument("file")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from ..formats.mole_file import read_mole_file
    from ..models import check_mole_name

    path = check_mole_name(args.file, "file")  # the rule every command shares (mole-tiny: its shipped file)
    check_file(path, "MoLE .safetensors", "file")  # readable
    manifest, tensors = read_mole_file(args.file)
    gates = sum(t.numel() for k, t in tensors.items() if k.startswith("gates."))
    experts = sum(t.numel() for k, t in tensors.items() if k.startswith("experts."))
    if args.json:
        print(json.dumps({**manifest, "tensor_counts": {"gate_values": gates, "expert_values": experts}}, indent=2))
        return 0
    print(_info_summary(args.file, manifest, gates, experts))
    return 0


def _info_summary(path: str, manifest: dict, gates: int, experts: int) -> str:
    """A few readable lines: base, experts, gating, layers, sizes, versions."""
    base = manifest.get("base_model") or {}
    cfg = manifest.get("config") or {}
    lines = [f"{path}"]
    lines.append(f"  base      {base.get('name') or '?'} ({base.get('backbone', '?')})")
    ex = manifest.get("experts") or []
    def ranks(e: dict) -> str:
        r = e.get("ranks") or []
        return "/".join(str(x) for x in r) if isinstance(r, list) and r else "?"

    names = ", ".join(f"{e.get('name')} (r={ranks(e)}, {e.get('num_layers', '?')} layers)" for e in ex) or "none"
    lines.append(f"  experts   {names}")
    if cfg:
        lines.append(f"  gating    {cfg.get('gating', '?')}, global source {cfg.get('global_source', '?')}")
    layers = manifest.get("layers")
    if layers is not None:
        lines.append(f"  layers    {len(layers)}")
    lines.append(f"  values    {gates:,} gate, {experts:,} expert")
    extra = manifest.get("extra") or {}
    if "instruct" in extra:
        lines.append("  kind      InstructMoLE (experts + instruction router)")
    versions = manifest.get("versions") or {}
    if versions:
        lines.append("  written   " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append("  (full manifest: mole info --json FILE)")
    return "\n".join(lines)
