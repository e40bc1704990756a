"""The three tasks on the shared engine: ``classification`` (E1–E3), ``detection`` (E5),
``segmentation`` (E6). Each folder holds the task's recipe, training and evaluation, and results
tables; :data:`TASKS` maps the command-line names to them."""

from __future__ import annotations

TASKS = {
    "cls": "anchorformer.tasks.classification",
    "det": "anchorformer.tasks.detection",
    "seg": "anchorformer.tasks.segmentation",
}
