"""The ``anchorformer`` command line.

Subcommands are contributed by the modules that implement them, each through a
``register(subparsers)`` function, so this file only lists where they live:

    anchorformer complexity ...          params / GMACs tables           (anchorformer.complexity)
    anchorformer data make-mini|verify   the datasets                    (anchorformer.data.cli)
    anchorformer bench ...               kernel and model benchmarks     (anchorformer.bench)
    anchorformer train cls|det|seg ...   training                        (anchorformer.tasks.*)
    anchorformer eval cls|det|seg ...    evaluation                      (anchorformer.tasks.*)

``train`` and ``eval`` have one set of flags for every task (this module); a task adds its own
through ``add_train_arguments(parser)`` / ``add_eval_arguments(parser)`` and runs through
``cli_train(args)`` / ``cli_eval(args)``:

    anchorformer train {cls,det,seg} --data ROOT --out DIR [--model NAME] [--profile mini|full]
                                     [--set KEY=VALUE]... [--resume auto|never|PATH] [--overwrite]
                                     [--epochs N]
    anchorformer eval  {cls,det,seg} --data ROOT --checkpoint PATH --out DIR [--set KEY=VALUE]...

In the mini profile (``train``/``eval`` with ``--profile mini``, ``data make-mini``, ``data stage``)
the command follows the CPU numeric path of :mod:`anchorformer.engine.numerics`: started without
its settings in the environment, it runs itself again with them (``python -m anchorformer.cli``),
since they must be in place before torch loads. Called as a function (``main(argv)``),
it runs as it is.

Errors a user can act on (a bad recipe value, a missing or unreadable file, a folder in use, a
bad data file met in training, a full disk) print one line and exit with status 2; ``--debug``
(or ``ANCHORFORMER_DEBUG=1``) shows the traceback. A training run stopped by SIGTERM or SIGUSR1
checkpoints after its current step and exits with status 143 or 75 (requeue); see
:mod:`anchorformer.engine.preempt`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

# (module, function) pairs; each function takes the subparsers object it adds to.
_TOP_LEVEL = [
    ("anchorformer.complexity", "register"),
    ("anchorformer.data.cli", "register"),
    ("anchorformer.bench", "register"),
    ("anchorformer.export", "register"),
]


def _import_optional(name: str):
    """Import ``name``; ``None`` only when that module itself does not exist (yet)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def _number(text: str) -> int | float:
    """``--epochs``: an integer, or a number the task's recipe judges (``1.5`` is refused by cls)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _add_task_parsers(train: Any, evaluate: Any) -> None:
    from .engine.recipe import PROFILES
    from .tasks import TASKS

    for task, module_name in TASKS.items():
        module = importlib.import_module(module_name + ".train")
        p = train.add_parser(task, help=module.TRAIN_HELP, description=module.TRAIN_HELP)
        p.add_argument("--data", required=True, help="dataset root (the mini set or the full dataset)")
        p.add_argument("--out", required=True, help="the run folder (checkpoints/, dvclive/, model.pth, metrics.json)")
        p.add_argument("--model", default=None, help="the backbone's timm name (default: the profile's)")
        p.add_argument("--profile", choices=PROFILES, default="mini", help="recipe preset (default: mini)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override a recipe key (value parsed as YAML; see anchorformer/configs/{task}.yaml); repeatable")  # fmt: skip
        p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                       help="auto (default): continue from the newest checkpoint in --out; never: a fresh start; or a checkpoint")  # fmt: skip
        p.add_argument("--overwrite", action="store_true",
                       help="with --resume never: move an earlier run's files to --out/previous-<timestamp>/")  # fmt: skip
        p.add_argument("--if-different", choices=("refuse", "restart"), default="refuse",
                       help="--resume auto with a checkpoint of another recipe (or code, with --set "
                       "restart_on_code_change=true): refuse (default), or restart (move it to "
                       "previous-<timestamp>/ and start afresh; what the pipeline uses)")  # fmt: skip
        p.add_argument("--epochs", type=_number, default=None, help="training epochs (default: the profile's)")
        if hasattr(module, "add_train_arguments"):
            module.add_train_arguments(p)
        p.set_defaults(func=module.cli_train)
        e = evaluate.add_parser(task, help=module.EVAL_HELP, description=module.EVAL_HELP)
        e.add_argument("--data", required=True, help="dataset root")
        e.add_argument("--checkpoint", required=True, help="model.pth or a training checkpoint (or other weights)")
        e.add_argument("--out", required=True, help="folder for metrics.json")
        e.add_argument("--model", default=None, help="the backbone's timm name, for weights that do not name it")
        e.add_argument("--profile", choices=PROFILES, default="mini", help="recipe preset for such weights")
        e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key (e.g. eval batch size, test settings); repeatable")  # fmt: skip
        if hasattr(module, "add_eval_arguments"):
            module.add_eval_arguments(e)
        e.set_defaults(func=module.cli_eval)


# What only a training run leaves in its folder: ``eval --out`` there would replace its metrics.json.
_TRAINING_RUN_FILES = (".run.lock", "checkpoints", "model.pth", "model.safetensors", "history.json")


def _refuse_training_run_out(args: argparse.Namespace) -> None:
    """``eval --out`` must not be a training run's folder (its metrics.json and timings.json)."""
    out = getattr(args, "out", None)
    if args.command != "eval" or out is None:
        return
    found = [name for name in _TRAINING_RUN_FILES if os.path.lexists(os.path.join(out, name))]
    if found:
        raise ValueError(
            f"--out {out} holds a training run ({', '.join(found)}); eval would replace its metrics.json: "
            f"give eval its own folder, e.g. --out {os.path.join(out, 'eval')}"
        )


def _refuse_unsafe_train_out(args: argparse.Namespace) -> None:
    """``train --out`` must not hold the dataset or a repository: a run folder is the run's alone
    (``--overwrite`` moves what it holds to ``previous-*/``)."""
    if args.command != "train":
        return
    if args.overwrite and args.resume != "never":
        raise ValueError(
            f"--overwrite applies only with --resume never (got --resume {args.resume}): "
            "add --resume never to start afresh, moving the earlier run to previous-<timestamp>/"
        )
    out, data = os.path.realpath(args.out), os.path.realpath(args.data)
    if data == out or data.startswith(out.rstrip(os.sep) + os.sep):
        raise ValueError(f"--out {args.out} contains --data {args.data}: give the run a folder of its own")
    marks = [name for name in (".git", ".dvc") if os.path.lexists(os.path.join(out, name))]
    if marks:
        raise ValueError(
            f"--out {args.out} is a repository ({', '.join(marks)}): give the run a folder of its own, e.g. runs/NAME"
        )


def _interrupted(args: argparse.Namespace) -> str:
    what = " ".join(str(p) for p in (args.command, getattr(args, "task", None) or "") if p)
    if args.command == "train":
        return (
            f"anchorformer {what}: interrupted; the run in {args.out} resumes from its newest checkpoint "
            "when the same command is run again (--resume auto)"
        )
    out = getattr(args, "out", None)
    return f"anchorformer {what}: interrupted" + (f"; {out} may be incomplete: run the command again" if out else "")


def follows_numeric_path(args: argparse.Namespace) -> bool:
    """Whether the command computes results of the mini profile (see the module docstring)."""
    if args.command in ("train", "eval"):
        return getattr(args, "profile", "mini") == "mini"
    if args.command == "data":
        return args.data_command == "make-mini" or (
            args.data_command == "stage" and getattr(args, "profile", "mini") == "mini"
        )
    return False


def _reexec_on_numeric_path(args: argparse.Namespace) -> None:
    """Run this command again with the numeric path's settings when it lacks them (never returns then)."""
    from .engine import numerics

    if not follows_numeric_path(args):
        return
    again = numerics.reexec_argv([sys.executable, "-m", "anchorformer.cli", *sys.argv[1:]])
    if again is not None:
        argv, env = again
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anchorformer",
        description="AnchorFormer: models, datasets, training, evaluation and benchmarks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
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
    _add_task_parsers(train, evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:  # the program, not a call from Python: settings before torch computes anything
        _reexec_on_numeric_path(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    debug = args.debug or os.environ.get("ANCHORFORMER_DEBUG", "") not in ("", "0")
    try:
        _refuse_training_run_out(args)
        _refuse_unsafe_train_out(args)
        rc = args.func(args)
    except (ValueError, OSError, KeyError) as e:
        # Bad input or a file system that refuses (disk full, no rights): one clear line, no
        # traceback from deep inside a library.
        if debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"anchorformer {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what stopped and how to go on, in one line
        if debug:
            raise
        print(_interrupted(args), file=sys.stderr)
        return 130
    return 0 if rc is None or isinstance(rc, dict) else int(rc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
