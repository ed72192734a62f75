"""``hydra/launcher=stacked``: the jobs of a sweep that differ only in their seed train together, as one stack.

    structlearn -m seed=range(10) method=rigl hydra/launcher=stacked

The sweep's jobs are grouped by their overrides without ``seed``; each group of jobs that can stack
(:func:`structlearn.stacked.why_not`) trains in this process as stacks of up to ``max_members``
(:func:`structlearn.stacked.train_stack`). Every member gets its own job directory, made by Hydra as for
any job (``.hydra/``), and the same files as if it had run alone, so reports, resume and
``structlearn-analyze`` read them as they read any run. A job that cannot stack, or is alone in its
group, runs alone as the basic launcher runs it, after one line saying why.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins.structlearn_launcher.base import ContextLauncher
from structlearn.run import seed_group, seed_variant
from structlearn.utils import check, is_int

log = logging.getLogger("structlearn")


class StackedLauncher(ContextLauncher):
    """Train the seeds of each sweep cell together (see the module's docstring).

    Args:
        max_members: the most members of one stack (a group of more trains as several stacks), >= 1.
    """

    def __init__(self, max_members: int = 50) -> None:
        check(is_int(max_members) and max_members >= 1, "max_members", max_members, "must be an integer >= 1")
        super().__init__()
        self.max_members = int(max_members)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from structlearn.stacked import why_not

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        cells: dict[
            tuple[str, ...], DictConfig
        ] = {}  # each cell composed once (structlearn.run.seed_variant)
        configs = [self._job_config(initial_job_idx + i, o, cells) for i, o in enumerate(job_overrides)]
        groups: dict[tuple[str, ...], list[int]] = {}
        alone: dict[int, str] = {}
        for i, overrides in enumerate(job_overrides):
            reason = why_not(self._resolved(configs[i]))
            if reason is None:
                groups.setdefault(seed_group(overrides), []).append(i)
            else:
                alone[i] = reason
        stacks = []
        for members in groups.values():
            for start in range(0, len(members), self.max_members):
                chunk = members[start : start + self.max_members]
                if len(chunk) == 1:
                    alone[chunk[0]] = "no other seed of its cell to stack with"
                else:
                    stacks.append(chunk)
        results: dict[int, JobReturn] = {}
        for chunk in stacks:
            nums = [initial_job_idx + i for i in chunk]
            log.info(
                "stack of %d: jobs %s (%s)", len(chunk), nums, " ".join(seed_group(job_overrides[chunk[0]]))
            )
            results.update(zip(chunk, self._stack([configs[i] for i in chunk]), strict=True))
        for i, reason in sorted(alone.items()):
            log.info("job %d runs alone: %s", initial_job_idx + i, reason)
            results[i] = self._alone(configs[i])
        return [results[i] for i in range(len(job_overrides))]

    # -- jobs -------------------------------------------------------------------------------------

    def _job_config(
        self, num: int, overrides: Sequence[str], cells: dict[tuple[str, ...], DictConfig]
    ) -> DictConfig:
        """Job ``num``'s config, as the basic launcher composes it (once per cell, then by its seed)."""
        assert self.config is not None and self.hydra_context is not None
        log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        cell = cells.get(seed_group(overrides))
        if cell is None:
            config = cells[seed_group(overrides)] = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
        else:
            config = seed_variant(cell, overrides)
        with open_dict(config):
            config.hydra.job.id = num
            config.hydra.job.num = num
        return config

    @staticmethod
    def _resolved(config: DictConfig) -> dict[str, Any]:
        HydraConfig.instance().set_config(config)
        task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            return OmegaConf.to_container(task, resolve=True)  # type: ignore[return-value]
        except Exception:  # the job reports what fails to resolve when it runs (alone)
            return {"method": {}, "model": {}}

    def _run_job(self, config: DictConfig, task_function: TaskFunction) -> JobReturn:
        assert self.hydra_context is not None and self.config is not None
        HydraConfig.instance().set_config(config)
        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def _alone(self, config: DictConfig) -> JobReturn:
        assert self.task_function is not None
        return self._run_job(config, self.task_function)

    def _stack(self, configs: Sequence[DictConfig]) -> list[JobReturn]:
        """Prepare every member in its own job (Hydra writes its directory), then train them together."""
        from structlearn import run as app
        from structlearn.stacked import train_stack

        with contextlib.ExitStack() as held:
            members: list[tuple[int, Any]] = []  # (position, its prepared run)
            returns: list[JobReturn] = []
            for position, config in enumerate(configs):

                def prepare(cfg: DictConfig, position: int = position) -> Any:
                    run_dir = HydraConfig.get().runtime.output_dir
                    try:
                        run, finished = held.enter_context(app.prepared(cfg, run_dir))
                    except app.ConfigError as exc:  # as the app answers it: this job alone fails
                        return app.config_failed(cfg, exc)
                    if run is None:
                        return app.objective(finished, cfg.get("optimized_metric"), cfg.get("failed_value"))
                    members.append((position, run))
                    return None

                returns.append(self._run_job(config, prepare))
            if members:
                with _member_logs([Path(run.run_dir.path) for _, run in members]):
                    summaries = train_stack([run for _, run in members])
                    for (position, run), summary in zip(members, summaries, strict=True):
                        # the member's job return, as the app's: what a sweeper reads
                        returns[position].status = JobStatus.COMPLETED
                        returns[position].return_value = app.job_result(
                            configs[position], summary, run.run_dir.path
                        )
        return returns


@contextlib.contextmanager
def _member_logs(run_dirs: Sequence[Path]) -> Any:
    """The stack's log lines in every member's ``structlearn.log`` (the members train in one process)."""
    handlers = [logging.FileHandler(d / "structlearn.log") for d in run_dirs]
    root = logging.getLogger()
    formatter = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    for handler in handlers:
        handler.setFormatter(
            formatter or logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        )
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
