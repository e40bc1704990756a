"""The ``anchorformer`` command line.

Subcommands are contributed by the modules that implement them, each through a
``register(subparsers)`` function, so this file only lists where they live:

    anchorformer complexity ...          params / GMACs tables           (anchorformer.complexity)
    anchorformer data make-mini|verify   the datasets                    (anchorformer.data.cli)
    anchorformer bench ...               kernel and model benchmarks     (anchorformer.bench)
    anchorformer train cls|det|seg ...   training                        (anchorformer.engine.*)
    anchorformer eval cls|det|seg ...    evaluation                      (anchorformer.engine.*)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

# (module, function) pairs; each function takes the subparsers object it adds to.
_TOP_LEVEL = [
    ("anchorformer.complexity_cli", "register"),
    ("anchorformer.data.cli", "register"),
    ("anchorformer.bench", "register"),
    ("anchorformer.export", "register"),
]
# Tasks of `train` and `eval`: each module has register_train(subparsers) and register_eval(subparsers).
_TASKS = [
    "anchorformer.engine.classification",
    "anchorformer.engine.detection",
    "anchorformer.engine.segmentation",
]


def _import_optional(name: str):
    """Import ``name``; ``None`` only when that module itself does not exist (yet)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anchorformer",
        description="AnchorFormer: models, datasets, training, evaluation and benchmarks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name, fn in _TOP_LEVEL:
        module = _import_optional(module_name)
        if module is not None:
            getattr(module, fn)(sub)
    train = sub.add_parser("train", help="train a model: cls, det or seg").add_subparsers(
        dest="task", metavar="TASK", required=True
    )
    evaluate = sub.add_parser("eval", help="evaluate a checkpoint: cls, det or seg").add_subparsers(
        dest="task", metavar="TASK", required=True
    )
    for module_name in _TASKS:
        module = _import_optional(module_name)
        if module is not None:
            module.register_train(train)
            module.register_eval(evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        # Bad input: one clear line, no traceback from deep inside a library.
        print(f"anchorformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
