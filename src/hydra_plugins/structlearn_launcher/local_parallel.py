"""``hydra/launcher=local_parallel``: jobs in parallel processes, where a dying worker takes only its own job.

Hydra's joblib launcher runs a sweep's jobs in a loky process pool. When a worker dies (SIGKILL, the
kernel's out-of-memory killer), loky breaks the whole pool: ``TerminatedWorkerError`` ends the sweep
and the jobs not yet started never run. This launcher runs the same jobs the same way, and when the
pool breaks it starts the unfinished jobs again in a fresh pool: a job that had started resumes from
its checkpoint (its directory is a run), one that had not starts. The jobs that were running when a
worker died are suspects: each runs again alone, in a pool of its own, so a job that kills its worker
every time (the out-of-memory killer) takes no other job with it; a job caught in two breaks is reported
as killed (the sweep's tally counts it) and resumes when the sweep is started again.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals

from hydra_plugins.structlearn_launcher.base import ContextLauncher
from structlearn.run_dir import RunDir
from structlearn.utils import JobKilled

log = logging.getLogger("structlearn")
TRIES = 2  # starts per job in one sweep: the first, and one after a dead worker


def _indexed_job(index: int, *args: Any) -> tuple[int, JobReturn]:
    from hydra_plugins.hydra_joblib_launcher import _core

    return index, _core.execute_job(*args)


class LocalParallelLauncher(ContextLauncher):
    """Hydra's joblib launcher, restarting the pool (and the unfinished jobs) when a worker dies.

    Args:
        **joblib: ``joblib.Parallel`` settings (``n_jobs``...), as for ``hydra/launcher=joblib``.
    """

    def __init__(self, **joblib: Any) -> None:
        super().__init__()
        self.joblib = joblib

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.hydra_joblib_launcher import _core  # the `launchers` extra
        from joblib import Parallel, delayed
        from joblib.externals.loky.process_executor import TerminatedWorkerError

        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        joblib_cfg = {**self.joblib, "backend": "loky"}
        _core.process_joblib_cfg(joblib_cfg)
        for idx, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
        state = Singleton.get_state()
        sweep = Path(str(self.config.hydra.sweep.dir))
        results: dict[int, JobReturn] = {}
        deaths: Counter[int] = Counter()  # pool breaks a started job was caught in
        suspects: list[int] = []  # started jobs caught in a break: each runs alone next, in a pool of its own
        pending = list(range(len(job_overrides)))
        while pending:
            batch = [i for i in pending if i not in suspects] or suspects[:1]
            jobs = (
                delayed(_indexed_job)(
                    i,
                    initial_job_idx + i,
                    job_overrides[i],
                    self.hydra_context,
                    self.config,
                    self.task_function,
                    state,
                )
                for i in batch
            )
            try:
                for i, ret in Parallel(**joblib_cfg, return_as="generator_unordered")(jobs):
                    results[i] = ret
            except TerminatedWorkerError as exc:
                # only jobs that had started (their directory is a run) were caught: the rest start as before
                caught = [
                    i for i in batch if i not in results and RunDir(sweep / str(initial_job_idx + i)).is_run()
                ]
                deaths.update(caught)
                suspects += [i for i in caught if i not in suspects]
                log.warning(
                    "a worker process died (%s); jobs %s were running and start again, each alone (at most %d times)",
                    str(exc).split(".")[0],
                    [initial_job_idx + i for i in caught],
                    TRIES,
                )
            pending = [i for i in pending if i not in results and deaths[i] < TRIES]
            suspects = [i for i in suspects if i in pending]
        return [
            results.get(i) or self._killed(initial_job_idx + i, job_overrides[i])
            for i in range(len(job_overrides))
        ]

    @staticmethod
    def _killed(num: int, overrides: Sequence[str]) -> JobReturn:
        killed = JobKilled(
            f"job {num} ({' '.join(overrides)}) was killed: its worker process died {TRIES} times; it resumes "
            "when the sweep is started again"
        )
        return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=killed)
