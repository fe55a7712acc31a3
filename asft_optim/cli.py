"""The ``asft`` command line: a thin layer over the library.

Each sub-command lives in the module that owns its feature and exposes
``add_parser(subparsers)``. Only the module of the command being run is imported:
``asft --help`` lists the commands from the table below, so it loads neither
transformers nor the lab (``tests/test_layout.py`` checks it). The lab's command is
named here as a string and imported by :mod:`importlib` only when ``asft lab`` runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main", "quiet_third_party_noise"]

# sub-command name -> (module providing ``add_parser(subparsers)``, its line in ``asft --help``;
# the same text as the module's own ``help=``, checked by tests/test_layout.py)
_COMMANDS: dict[str, tuple[str, str]] = {
    "anchors": ("asft_optim.anchors_cli", "build or inspect anchor files"),
    "landscape": (
        "asft_optim.landscape_cli",
        "cosines with d_aligned, 1-D/2-D safety landscapes and EPL (AsFT §3.2, §4.3)",
    ),
    "safe-lora": (
        "asft_optim.baselines_cli",
        "Safe LoRA: project the least aligned LoRA layers of a saved adapter onto the anchors",
    ),
    "lab": ("asft_optim.lab.cli", "the miniature safety lab (Table 2 at CPU scale)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``asft`` parser with ``command``'s full sub-parser (None: every command, each
    as a stub that only lists it; nothing is imported)."""
    parser = argparse.ArgumentParser(prog="asft", description="AsFT: safety-anchored fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in _COMMANDS.items():
        if name == command:
            importlib.import_module(module_name).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The sub-command ``argv`` names: its first non-option word, if it is one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in _COMMANDS else None


#: Third-party log records that are not errors for any ``asft`` command, by logger name and
#: message prefix. bitsandbytes (imported by peft and transformers when installed) logs this
#: warning at import on CPUs with AVX512-BF16 when it cannot fetch an optional 4-bit kernel
#: from the Hub; no command uses 4-bit kernels.
_QUIET: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class _DropKnownNoise(logging.Filter):
    """Drops the records of one logger whose message starts with a known prefix, only."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.ERROR and str(record.msg).startswith(self.prefixes))


def quiet_third_party_noise() -> None:
    """Install the filters of :data:`_QUIET` (once; loggers may be configured before their
    module is imported, so nothing is imported here)."""
    for name, prefixes in _QUIET.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise(prefixes))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party_noise()
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
