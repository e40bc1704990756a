"""Where the package's progress bars and log lines go: a terminal, a pipeline stage, or a kernel.

Three places run the package, and each wants its own:

- **a terminal** (``anchorformer train ...``): tqdm bars on standard error when it is a terminal;
  the command line sets up the log itself.
- **a pipeline stage** (``scripts/run_stage.py`` runs a notebook in a kernel through papermill):
  no bars, and the log goes to the terminal the stage runs in, never into the executed notebook,
  which DVC hashes and which must not change with the clock. The stage's kernel says so by
  setting :data:`STAGE_ENV` before the notebook runs (``scripts/kernel_startup.py``).
- **an interactive kernel** (JupyterLab, Jupyter, VS Code): a ``tqdm.auto`` bar per epoch or run
  (a widget in Lab) and the ``anchorformer`` log at INFO in the output of the cell that runs
  (standard output), as it
  happens. A kernel shows no log by default, so :func:`show_log_in_kernel` adds one handler, once,
  when the package is imported there.

Standard library only (this is the lowest floor of the package).
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["STAGE_ENV", "in_interactive_kernel", "show_log_in_kernel", "show_progress"]

STAGE_ENV = "ANCHORFORMER_LOG_TO_TERMINAL"  # set in a pipeline stage's kernel: log to its terminal
_HANDLER_NAME = "anchorformer-kernel"


def in_interactive_kernel() -> bool:
    """True inside a Jupyter kernel that a person drives (JupyterLab, nbval, plain papermill), not a stage's."""
    if os.environ.get(STAGE_ENV):
        return False
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def show_progress() -> bool:
    """Whether progress bars show: in a terminal, or in an interactive kernel (as widgets)."""
    stream = sys.stderr
    try:
        tty = stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty or in_interactive_kernel()


def show_log_in_kernel(level: int = logging.INFO) -> bool:
    """In an interactive kernel, send the ``anchorformer`` log at ``level`` to the running cell's output.

    Does nothing elsewhere, or when the ``anchorformer`` logger already has a handler (a stage's,
    a user's own set-up, or an earlier call). Returns whether a handler was added.
    """
    if not in_interactive_kernel():
        return False
    logger = logging.getLogger("anchorformer")
    if logger.handlers:
        return False
    # sys.stdout in a kernel writes to the output of whichever cell is running at the time (standard
    # output, not error: Lab paints standard error red, and these are progress lines, not failures)
    handler = logging.StreamHandler(sys.stdout)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    return True
