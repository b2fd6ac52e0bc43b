"""Command line: each subcommand lives in its own module with ``register`` and ``run``.

Exit codes: 0 ok; 2 bad usage or bad input (one line on stderr, nothing written); 3 a check
failed (nothing written); 1 an internal error (with traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from onnxrep.errors import OnnxrepError, VerificationError
from onnxrep.progress import quiet

SUBCOMMANDS = ["optimize", "inspect", "eval", "quantize", "restore-bn", "fold-bn", "reparam",
               "qat", "bench"]


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
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # each distinct warning once
        warnings.showwarning = _warning_printer(args.command)
        return _run(parser, args)


def _warning_printer(command: str):
    """Warnings (numpy's RuntimeWarnings, pillow's, ...) as one line each in the tool's words,
    never raw source lines; each distinct message once."""
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        if text not in seen:
            seen.add(text)
            print(f"onnxrep {command}: warning: {text}", file=sys.stderr)

    return show


def _run(parser, args) -> int:
    try:
        with quiet(getattr(args, "quiet", False) or getattr(args, "json", False)):
            return args.run(args) or 0
    except OnnxrepError as exc:
        print(f"onnxrep {args.command}: error: {message(exc, _flags(parser, args.command))}",
              file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the disk or the permissions, not onnxrep: one line, exit 2
        from onnxrep.ir.model import WRITE_ERRORS, os_error_text

        if os_error_text(exc) is None or _errno(exc) not in WRITE_ERRORS:
            raise
        print(f"onnxrep {args.command}: error: {os_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"onnxrep {args.command}: interrupted", file=sys.stderr)
        return 130


def _errno(exc: OSError):
    from onnxrep.ir.model import _errno as errno_of

    return errno_of(exc)


def message(exc: OnnxrepError, flags: dict[str, str]) -> str:
    """The library's message in the command's words: the flag for the parameter it is about,
    the tolerance flag that would have passed, and that nothing was written."""
    text = str(exc)
    flag = flags.get(exc.option or "")
    if isinstance(exc, VerificationError):
        if exc.needed is not None and flag:
            text += f" (would have needed {flag} {exc.needed:.0e})"
        return text + "; nothing written"
    if exc.option == "force" and flag:
        return f"{text} (use {flag} to overwrite)"
    if flag and text.startswith(f"{exc.option} "):  # the parameter named first: name the flag
        return flag + text[len(exc.option):]
    return f"{flag}: {text}" if flag else text


def _flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """dest -> the command's long flag for it."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: max(a.option_strings, key=len) for a in sub.choices[command]._actions
            if a.option_strings}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxrep")
    except PackageNotFoundError:
        return "onnxrep (not installed)"
