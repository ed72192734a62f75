"""Preemption: a signal that announces the end of a job becomes a checkpoint, then the signal acts."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("structlearn")


class PreemptionGuard:
    """Turn preemption signals into a checkpoint at the next step boundary, then let them act.

    The runner holds the guard for the whole run: a signal during set-up is answered at the first
    step boundary, and one that arrives after the last step is dropped (the run completes).

    SLURM and submitit announce the end of a job with SIGTERM or a user signal (submitit uses
    SIGUSR2 by default, SIGUSR1 in older setups, and the signal ``$SUBMITIT_PREEMPT_SIGNAL`` names
    where a site sets one). The handler only notes the signal; the loop
    writes a checkpoint and then calls the handler that was installed before (submitit's, which
    requeues the job and exits), or exits with status 128 + signal if there was none. Handlers
    can only be set from the main thread; elsewhere the guard does nothing.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
    SITE_SIGNAL = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's setting for a site's own signal (USR2 by default)

    @classmethod
    def signals(cls) -> list[int]:
        """The signals noted: SIGTERM, SIGUSR1, SIGUSR2 and the one ``$SUBMITIT_PREEMPT_SIGNAL`` names (``USR1``, ``INT``...)."""
        names = list(cls.SIGNALS)
        site = os.environ.get(cls.SITE_SIGNAL, "").strip().upper()
        if site:
            name = site if site.startswith("SIG") else f"SIG{site}"
            if isinstance(getattr(signal, name, None), signal.Signals) and name not in names:
                names.append(name)
            elif name not in names:
                log.warning("%s=%s names no signal; it is not watched", cls.SITE_SIGNAL, site)
        return [getattr(signal, n) for n in names if getattr(signal, n, None) is not None]

    def __init__(self) -> None:
        self.pending: list[int] = []  # every signal noted since the last forward, in order
        self.received: str | None = None  # the last signal acted on, for the summary
        self.handed_on = False  # the last signal went to a handler installed before (submitit's)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals():
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _note(self, signum: int, frame: Any) -> None:
        if signum not in self.pending:
            self.pending.append(signum)

    def take(self) -> list[int]:
        """The signals noted so far (taken before the checkpoint that answers them is written)."""
        taken, self.pending = self.pending, []
        return taken

    def drop(self, why: str) -> None:
        """Forget the signals noted so far (received when there is nothing left to save), saying why."""
        for signum in self.take():
            log.warning("%s received: %s", signal.Signals(signum).name, why)

    def forward(self, signums: Sequence[int], saved: bool) -> None:
        """Hand ``signums`` to the handlers installed before, SIGTERM first.

        SIGTERM goes first because submitit only logs it (bypass) and acts on its own user signal,
        which requeues and exits: forwarded last, it is never lost behind the other.
        """
        for signum in sorted(signums, key=lambda s: s != signal.SIGTERM):
            name = signal.Signals(signum).name
            previous = self._previous.get(signum, signal.SIG_DFL)
            log.warning(
                "%s received: %s; handing the signal on",
                name,
                "checkpoint written" if saved else "no checkpoints",
            )
            self.received = name  # the summary names it if the handler ends the run
            self.handed_on = callable(previous)
            if callable(previous):
                previous(signum, None)  # submitit: checkpoint the job, requeue it, exit
            elif previous != signal.SIG_IGN:
                raise SystemExit(128 + signum)
            self.received, self.handed_on = None, False  # ignored or bypassed (submitit bypasses SIGTERM)

    @property
    def requeued(self) -> bool:
        """Whether the handler the last signal went to ended the process (submitit does, after requeuing the job).

        Read while its ``SystemExit`` propagates: a handler that does not requeue (submitit after
        the last allowed time-out) raises another exception instead.
        """
        return self.received is not None and self.handed_on
