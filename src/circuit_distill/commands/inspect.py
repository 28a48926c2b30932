"""``circuit-distill inspect MODEL``: family, sizes, parameter count and the self-check."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("inspect", help="describe a model: family, layers, heads, KV heads, head width, params, self-check")
    p.add_argument("model", help="local directory, builtin:NAME or hub id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import SelfCheckError
    from ..model import load_model

    model = load_model(args.model, check=False)
    try:
        from ..model import self_check

        err = self_check(model)
        check = f"passed (max abs error {err:.2e})"
    except SelfCheckError as e:
        err, check = None, f"FAILED: {e}"
    model.self_check_error = err
    info = model.summary()
    info["self_check"] = check
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            if k != "self_check_max_abs_error":
                print(f"{k.replace('_', ' '):<{width}}  {v:,}" if isinstance(v, int) else f"{k.replace('_', ' '):<{width}}  {v}")
    return 0 if err is not None else 1
