"""Command line: each subcommand lives in its own module with ``register`` and ``run``.

Exit codes: 0 ok; 2 bad usage or bad input (one line on stderr, nothing written); 3 a check
failed (nothing written); 1 an internal error (with traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from onnxrep.errors import OnnxrepError
from onnxrep.progress import set_quiet

SUBCOMMANDS = ["optimize", "inspect", "eval", "quantize", "restore-bn", "fold-bn", "reparam", "qat"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxrep", description="Make re-parameterized CNNs (RepVGG, "
                     "MobileOne, PP-LCNet) quantize well: CLE, BN restore, PTQ and QAT on ONNX.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"onnxrep.cli.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0],
                           description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.register(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_quiet(getattr(args, "quiet", False) or getattr(args, "json", False))
    try:
        return args.run(args) or 0
    except OnnxrepError as exc:
        print(f"onnxrep {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"onnxrep {args.command}: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxrep")
    except PackageNotFoundError:
        return "onnxrep (not installed)"
