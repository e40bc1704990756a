"""The global batch of a recipe on any number of processes: per-device batch and gradient accumulation.

A recipe states its anchor's global batch (images or crops per optimizer step over all processes:
DeiT 1,024, Mask R-CNN 16, ADE20K 16) and the batch one device holds. With fewer processes than
the anchor's, :func:`plan_batch` accumulates gradients over ``accum_steps`` micro-batches so that
the effective global batch, and the learning rate scaled from it, are the recipe's; with more, the
per-device batch shrinks. When no split is exact (a global batch of 1,024 on 3 processes), the
effective global batch differs from the recipe's: the run says so in its log and its
``metrics.json`` (:meth:`BatchPlan.record`), and the report lists it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["BatchPlan", "plan_batch"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    """How a run makes its global batch.

    Attributes:
        per_device: samples per forward/backward pass on one process (a micro-batch).
        world_size: processes.
        accum_steps: micro-batches accumulated per optimizer step.
        recipe_global_batch: the recipe's global batch.
    """

    per_device: int
    world_size: int
    accum_steps: int
    recipe_global_batch: int

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all processes: per_device x world_size x accum_steps."""
        return self.per_device * self.world_size * self.accum_steps

    @property
    def matches(self) -> bool:
        """Whether the effective global batch is the recipe's."""
        return self.global_batch == self.recipe_global_batch

    def record(self) -> dict[str, Any]:
        """The keys every run writes into ``metrics.json`` and its run description."""
        return {
            "global_batch": self.global_batch,
            "world_size": self.world_size,
            "accum_steps": self.accum_steps,
            "per_device_batch": self.per_device,
            "recipe_global_batch": self.recipe_global_batch,
        }

    def describe(self) -> str:
        """One line for the log; names the difference when the global batch is not the recipe's."""
        line = (
            f"global batch {self.global_batch} = {self.per_device} per device x {self.world_size} process(es)"
            f" x {self.accum_steps} accumulation step(s)"
        )
        if not self.matches:
            line += (
                f"; DIFFERS from the recipe's global batch {self.recipe_global_batch}"
                " (no exact split over these processes): the learning rate is scaled to the effective batch"
            )
        return line

    def log(self, logger: logging.Logger | None = None) -> None:
        """Log :meth:`describe` (a warning when the global batch differs from the recipe's)."""
        (logger or _logger).log(logging.INFO if self.matches else logging.WARNING, "%s", self.describe())


def plan_batch(global_batch: int | None, per_device: int, world_size: int, accum_steps: int = 1) -> BatchPlan:
    """The per-device batch and accumulation steps that make ``global_batch`` on ``world_size`` processes.

    Args:
        global_batch: the recipe's global batch; ``None``: ``per_device x world_size x accum_steps``
            (the batch follows the processes, nothing is derived).
        per_device: the most samples one process holds in a forward pass.
        world_size: processes.
        accum_steps: the accumulation of a recipe without ``global_batch``.

    Returns:
        The exact split when the processes divide the global batch: each process takes
        ``global_batch / world_size`` samples in the fewest micro-batches of equal size at most
        ``per_device``. Otherwise ``per_device`` samples and the accumulation closest to the
        recipe's batch, whose :attr:`BatchPlan.matches` is false.

    Raises:
        ValueError: a batch or process count below 1.
    """
    if per_device < 1 or world_size < 1 or accum_steps < 1:
        raise ValueError(
            f"per-device batch {per_device}, processes {world_size} and accumulation {accum_steps} must be >= 1"
        )
    if global_batch is None:
        return BatchPlan(per_device, world_size, accum_steps, per_device * world_size * accum_steps)
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1; got {global_batch}")
    share, rest = divmod(global_batch, world_size)
    if share >= 1 and rest == 0:
        for accum in range(math.ceil(share / per_device), share + 1):
            if share % accum == 0:
                return BatchPlan(share // accum, world_size, accum, global_batch)
    accum = max(1, round(global_batch / (per_device * world_size)))
    return BatchPlan(per_device, world_size, accum, global_batch)
