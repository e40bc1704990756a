"""Run by the kernel of a pipeline stage before the notebook (``scripts/run_stage.py``).

The package logs through ``logging`` (epochs, losses, metrics, evaluation); a kernel shows no log
by default. This sends the ``anchorformer`` loggers' INFO records to the terminal the stage runs
in (the kernel's original standard error, which ipykernel keeps aside), not into the notebook.
It also sets ``ANCHORFORMER_LOG_TO_TERMINAL`` (``anchorformer.console.STAGE_ENV``), so the package
draws no progress bar here and adds no log handler of its own: nothing that depends on the clock
enters the executed notebook. It leaves no name behind in the notebook's namespace.
"""


def _log_to_terminal() -> None:
    import logging
    import os
    import sys

    os.environ["ANCHORFORMER_LOG_TO_TERMINAL"] = "1"  # anchorformer.console.STAGE_ENV
    fd = getattr(sys.stderr, "_original_stdstream_copy", None)
    stream = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8") if fd is not None else sys.__stderr__
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("anchorformer")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


_log_to_terminal()
del _log_to_terminal
