"""``circuit-distill demo``: the main job on the embedded default teacher and student."""

from __future__ import annotations

import dataclasses


def register(sub) -> None:
    p = sub.add_parser("demo", help="distil the built-in entity-tracking teacher into the built-in student with "
                                    "every method of the paper's table, over several seeds, and write a report")
    p.add_argument("--out", default="runs/demo", help="output directory (results.json, report.html, runs.json)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1); default 3")
    p.add_argument("--steps", type=int, default=None, help="distillation steps per run (default: DemoConfig.steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DemoConfig field, e.g. --set lr=0.001 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_overrides(cfg, overrides: list[str]):
    """Apply ``key=value`` strings to a DemoConfig; an unknown key is a ConfigError naming the valid ones."""
    import yaml

    from ..errors import ConfigError

    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        if key not in fields:
            raise ConfigError(f"unknown demo setting {key!r}; valid: {', '.join(fields)}")
        value = yaml.safe_load(raw)
        current = getattr(cfg, key)
        if isinstance(current, float) and isinstance(value, int):
            value = float(value)
        if current is not None and not isinstance(value, type(current)):
            raise ConfigError(f"demo setting {key!r} expects {type(current).__name__}, got {raw!r}")
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def run(args) -> int:
    from ..demo import DemoConfig, run_demo
    from ..errors import ConfigError

    if args.seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    cfg = DemoConfig(seeds=list(range(args.seeds)))
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    cfg = parse_overrides(cfg, args.overrides)
    run_demo(cfg, args.out, progress=not args.quiet)
    return 0
