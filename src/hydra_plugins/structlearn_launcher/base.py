"""What structlearn's own launchers share: Hydra's context, kept from ``setup`` for ``launch``."""

from __future__ import annotations

from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class ContextLauncher(Launcher):
    """A launcher that keeps the config, task function and Hydra context it is set up with."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context
