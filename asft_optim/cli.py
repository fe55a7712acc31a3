"""The ``asft`` command line: a thin layer over the library.

Each sub-command lives in the module that owns its feature and exposes
``add_parser(subparsers)``; it is imported lazily so ``asft --help`` stays fast
and optional dependencies load only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# sub-command name -> module providing ``add_parser(subparsers)``
_COMMANDS: dict[str, str] = {
    "anchors": "asft_optim.anchors_cli",
    "landscape": "asft_optim.landscape_cli",
    "safe-lora": "asft_optim.baselines_cli",
    "lab": "asft_optim.lab.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asft", description="AsFT: safety-anchored fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in _COMMANDS.values():
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
