"""qc passes: list passes (with options), recipes and targets."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("passes", help="list the available passes, recipes and targets")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcompiler.pipeline import available_passes, config_defaults, format_value
    from qcompiler.recipes import available_recipes
    from qcompiler.targets import TARGETS

    print("passes:")
    for name, cls in available_passes().items():
        # written as a pipeline text writes them, so a listed default can be copied into --passes
        opts = ",".join(f"{k}={format_value(v)}" for k, v in config_defaults(cls).items())
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"  {name}{{{opts}}}" if opts else f"  {name}")
        if doc:
            print(f"      {doc}")
    print("recipes:")
    for name, r in available_recipes().items():
        print(f"  {name:<22} {r.description}{'  [needs --calib]' if r.needs_calibration else ''}")
    print(f"targets: {', '.join(TARGETS)}")
    return 0
