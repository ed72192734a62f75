"""``hydra/launcher=slurm``: Hydra's submitit launcher, with two checks SLURM itself does not make loudly.

* **Before submitting**, what each job asks for (CPUs, memory, GPUs per node) is checked against
  the nodes of its partition (``sinfo``): a request no node can ever satisfy pends forever with the
  reason ``PartitionConfig`` while the sweep waits silently, so it stops here with one line naming
  the setting to change.
* **After the jobs end**, a job that ended without a result (cancelled with ``scancel``, not requeued
  after its last time-out, its node lost) is reported by its SLURM id and state in one line and
  counted by the sweep's tally; the jobs that finished keep their results. Hydra's launcher raises
  at the first such job instead, and the sweep's other results are lost.

Preempted and timed-out jobs are requeued by submitit (``max_num_timeout`` times for time-outs);
the run continues from its checkpoint in the same directory (``structlearn.preemption``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

from structlearn.utils import ConfigError, JobKilled

log = logging.getLogger("structlearn")


def _gpus(gres: str) -> int:
    """GPUs in an ``sinfo`` GRES field (``gpu:4``, ``gpu:a100:8(S:0-1)``, ``(null)``)."""
    total = 0
    for item in gres.split(","):
        match = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if match:
            total += int(match.group(1))
    return total


def partition_nodes(partition: str | None) -> list[dict[str, Any]]:
    """Each node of ``partition`` (the default one if None): its CPUs, memory (MB) and GPUs; [] if unknown."""
    command = ["sinfo", "-h", "-N", "-o", "%N|%c|%m|%G|%P"]
    if partition:
        command += ["-p", partition]
    out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    nodes = []
    for line in out.stdout.splitlines():
        name, cpus, memory, gres, part = line.split("|")
        if not partition and not part.endswith("*"):
            continue  # without a partition, SLURM uses the default one (marked *)
        nodes.append(
            {
                "name": name,
                "cpus": int(cpus.rstrip("+")),
                "mem_mb": int(memory.rstrip("+")),
                "gpus": _gpus(gres),
            }
        )
    return nodes


def check_request(params: dict[str, Any], nodes: Sequence[dict[str, Any]]) -> None:
    """Raise :class:`ConfigError` naming the first setting that no node of the partition can satisfy."""
    where = f"partition {params.get('partition')!r}" if params.get("partition") else "the default partition"
    if not nodes:
        raise ConfigError(
            f"hydra.launcher.partition={params.get('partition')!r} is invalid: sinfo lists no node in {where}"
        )
    tasks = int(params.get("tasks_per_node") or 1)
    asks = {
        "cpus_per_task": (int(params.get("cpus_per_task") or 1) * tasks, "cpus", "CPUs"),
        "mem_gb": (float(params.get("mem_gb") or 0) * 1024, "mem_mb", "MB of memory"),
        "gpus_per_node": (int(params.get("gpus_per_node") or 0), "gpus", "GPUs"),
    }
    for key, (need, field, unit) in asks.items():
        most = max(node[field] for node in nodes)
        if need > most:
            raise ConfigError(
                f"hydra.launcher.{key}={params.get(key)!r} is invalid: each job would need {need:g} {unit} per node "
                f"and the largest node of {where} has {most:g}; the jobs would pend forever (lower it, or choose "
                "another partition with hydra.launcher.partition=...)"
            )


GONE_AFTER_S = 10.0  # a job out of the queue this long without a result has ended without one


def _in_queue(job_id: str) -> bool:
    """Whether SLURM still lists the job (pending, running, requeued, completing)."""
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False
    )
    return out.returncode == 0 and bool(out.stdout.strip())


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


class _Reported:
    """A submitted job whose ``results()`` never raises: a job without a result becomes a failed return.

    Besides submitit's own check (the result file, or the state from ``sacct``), a job that has left
    the queue for :data:`GONE_AFTER_S` without a result file has ended without one: on a cluster
    without accounting ``sacct`` cannot say so, and submitit would wait forever.
    """

    def __init__(self, job: Any, overrides: Sequence[str], num: int) -> None:
        self.job, self.overrides, self.num = job, list(overrides), num

    def results(self) -> list[JobReturn]:
        gone_since = None
        while not self.job.done():
            if _in_queue(self.job.job_id):
                gone_since = None
            elif gone_since is None:
                gone_since = time.monotonic()
            elif time.monotonic() - gone_since > GONE_AFTER_S:
                return self._failed(
                    "it left the queue without a result (cancelled, killed, or its node lost)"
                )
            time.sleep(1)
        try:
            returns = self.job.results()
        except Exception as exc:  # cancelled, not requeued, node failure: the others keep their results
            return self._failed(_last_line(exc))
        failed = returns[0].status == JobStatus.FAILED and not isinstance(returns[0]._return_value, JobKilled)
        if failed:  # the job raised (submitit refused to requeue it, say): its summary says why
            return self._failed(_last_line(returns[0]._return_value))
        return returns

    def _failed(self, reason: str) -> list[JobReturn]:
        state = getattr(self.job, "state", "UNKNOWN")
        ended = JobKilled(
            f"job {self.num} (slurm job {self.job.job_id}, state {state}) ended without a result: {reason}"
        )
        log.error("%s", ended)
        return [JobReturn(overrides=self.overrides, status=JobStatus.FAILED, _return_value=ended)]


@contextlib.contextmanager
def _reporting_jobs() -> Iterator[None]:
    """While Hydra's launcher collects results: each submitted job wrapped in :class:`_Reported`."""
    import submitit

    real = submitit.AutoExecutor.map_array

    def map_array(executor: Any, fn: Any, *iterable: Any) -> list[Any]:
        jobs = real(executor, fn, *iterable)
        overrides, nums = iterable[0], iterable[2]  # (overrides, dir key, job num, job id, state) per job
        return [_Reported(job, o, n) for job, o, n in zip(jobs, overrides, nums, strict=True)]

    submitit.AutoExecutor.map_array = map_array
    try:
        yield
    finally:
        submitit.AutoExecutor.map_array = real


class CheckedSlurmLauncher(SlurmLauncher):
    """Hydra's submitit SLURM launcher, checking requests against ``sinfo`` and reporting jobs that end without a result."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if shutil.which("sinfo"):
            check_request(self.params, partition_nodes(self.params.get("partition")))
        else:
            log.warning("sinfo not found: the request is not checked against the partition")
        with _reporting_jobs():
            return super().launch(job_overrides, initial_job_idx)
