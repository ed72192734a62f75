"""The structure analysis of a run: its graph of active connections, topology and motif profile.

:class:`StructureAnalysis` is what the runner calls (config group ``analysis``): at evaluation
points every ``every`` epochs, for motif trajectories over training, and once at the end, on the
network used for evaluation. It reads the network only through the method's
:meth:`~structlearn.methods.base.Method.graph` hook, so it is the same for every method. Results go
into ``<run dir>/structure/``:

==========================  ==============================================================
``profile.csv``             per motif: count, null mean, null std, z (the end of the run)
``profile.json``            the same as flat keys, with the topology numbers
``topology.json``           per layer: nodes, in/out-degree summaries and histograms, dead,
                            isolated; per layer pair: edges, possible, density
``profile.png``             the motif z-score profile
``trajectory.csv``          one row per analysed epoch: topology, ``churn``, ``ever_active``,
                            ``count/``, ``z/`` keys
``trajectory.png``          z-scores over training (with ``every``)
``graph.npz`` ...           the final graph (``export``: npz, graphml, edges)
``lesions.csv``             with ``lesions``: every motif lesion and control draw, its accuracies
                            and their change from the intact network (:mod:`.lesions`)
==========================  ==============================================================

and the headline numbers into ``summary.json`` under ``structure_analysis``. The null model's
randomness comes from a generator seeded by the run's seed and the epoch, so an analysis is a pure
function of the network and a resumed run repeats it exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from structlearn.analysis.graph import SignedGraph, write_graph
from structlearn.analysis.lesions import CONTROLS, LESION_MOTIFS, lesion_study, lesion_summary
from structlearn.analysis.motifs import MotifProfile, motif_census, motif_profile
from structlearn.analysis.plots import plot_profile, plot_trajectory
from structlearn.analysis.topology import layer_stats, possible_edges, topology_summary
from structlearn.utils import (
    atomic_write_json,
    check,
    check_bool,
    check_int,
    check_number,
    is_list,
    is_number,
    json_plain,
    write_csv,
)

log = logging.getLogger("structlearn")

EXPORTS = ("npz", "graphml", "edges")
# What summary.json keeps of an analysis (the rest is in structure/profile.json).
HEADLINE = (
    "nodes",
    "edges",
    "density",
    "dead",
    "isolated",
    "positive_fraction",
    *(f"{kind}/{motif}" for motif in ("chain", "ffl", "bifan", "diamond") for kind in ("count", "z")),
    "balance/ffl",
    "z/balance/ffl",
    "balance/diamond",
    "z/balance/diamond",
)


def analyse(
    graph: SignedGraph,
    randomizations: int,
    seed: Sequence[int],
    swaps_per_edge: float = 10.0,
    by_sign: bool = False,
) -> tuple[dict[str, float], MotifProfile | None]:
    """Topology and motif numbers of one graph, flat (``count/ffl``, ``z/ffl``, ``balance/ffl``...).

    With ``randomizations=0`` only the census is taken (counts and balance, no z-scores).
    """
    numbers = topology_summary(graph)
    if randomizations == 0:
        census = motif_census(graph)
        numbers.update({k if k.startswith("balance/") else f"count/{k}": v for k, v in census.items()})
        return numbers, None
    profile = motif_profile(
        graph,
        randomizations=randomizations,
        seed=np.random.default_rng(list(seed)),
        swaps_per_edge=swaps_per_edge,
        by_sign=by_sign,
    )
    numbers.update(profile.as_dict())
    return numbers, profile


LESION_DEFAULTS = {
    "motifs": ["bifan", "diamond/unbalanced"],
    "controls": 5,
    "kinds": list(CONTROLS),
    "top_fraction": None,
}


def check_lesions(lesions: Mapping[str, Any], name: str = "lesions") -> dict[str, Any]:
    """Lesion settings with their defaults filled in, every value checked (errors name ``lesions.<key>``)."""
    given = dict(lesions)
    unknown = sorted(set(given) - set(LESION_DEFAULTS))
    check(not unknown, name, given, f"takes only the keys {sorted(LESION_DEFAULTS)}, not {unknown}")
    out = {**LESION_DEFAULTS, **given}
    check(
        is_list(out["motifs"], lambda m: m in LESION_MOTIFS) and len(out["motifs"]) > 0,
        f"{name}.motifs",
        out["motifs"],
        f"must be a non-empty list, each one of {LESION_MOTIFS}",
    )
    check_int(out["controls"], f"{name}.controls", 1)
    check(
        is_list(out["kinds"], lambda k: k in CONTROLS),
        f"{name}.kinds",
        out["kinds"],
        f"must be a list, each one of {CONTROLS}",
    )
    top = out["top_fraction"]
    check(
        top is None or (is_number(top) and 0 < top <= 1),
        f"{name}.top_fraction",
        top,
        "must be in (0, 1] (the most embedded edges) or null (every edge of the class)",
    )
    return {
        "motifs": list(out["motifs"]),
        "controls": int(out["controls"]),
        "kinds": list(out["kinds"]),
        "top_fraction": None if top is None else float(top),
    }


def run_lesions(
    model: torch.nn.Module,
    graph: SignedGraph,
    evaluate: Callable[[], Mapping[str, float]],
    settings: Mapping[str, Any],
    seed: Sequence[int],
    out: Path,
) -> tuple[dict[str, float], Path]:
    """:func:`~structlearn.analysis.lesions.lesion_study` with ``settings``; writes ``out/lesions.csv``.

    Returns the headline (:func:`~structlearn.analysis.lesions.lesion_summary` of ``test_acc``) and the file.
    """
    rows = lesion_study(
        model,
        graph,
        evaluate,
        settings["motifs"],
        settings["controls"],
        settings["kinds"],
        list(seed),
        settings["top_fraction"],
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "lesions.csv"
    write_csv(path, rows)
    return lesion_summary(rows, "test_acc"), path


class StructureAnalysis:
    """When and how to analyse the learned structure of a run (the ``analysis`` config group).

    Args:
        at_end: analyse the final network (``structure/`` files, ``summary.json`` headline).
        every_epochs: also analyse every this many epochs, at evaluation points (``trajectory.csv``);
            null: only at the end. Each analysis costs a census per randomisation.
        randomizations: degree-preserving randomised graphs per analysis (z-scores); 0: counts
            and balance only.
        swaps_per_edge: accepted edge swaps per edge in each randomisation.
        by_sign: swap only edges of the same sign (the null then also keeps signed degrees).
        export: graph files written at the end: ``npz``, ``graphml`` (networkx, Gephi), ``edges``
            (CSV edge list ``source,target,weight,sign``).
        graphml_max_edges: GraphML is skipped above this many edges (it is slow and large there;
            npz and edges are not).
        lesions: null (the default: none), or the motif lesions of the final network (:mod:`.lesions`):
            ``motifs`` (classes of ``LESION_MOTIFS``), ``controls`` (draws per control kind, >= 1),
            ``kinds`` (``random``, ``degree``), ``top_fraction`` (null: every edge of the class; a fraction:
            the most embedded edges); keys left out take :data:`LESION_DEFAULTS`.
    """

    def __init__(
        self,
        at_end: bool = True,
        every_epochs: int | None = None,
        randomizations: int = 20,
        swaps_per_edge: float = 10.0,
        by_sign: bool = False,
        export: Sequence[str] = ("npz",),
        graphml_max_edges: int = 200_000,
        lesions: Mapping[str, Any] | None = None,
    ) -> None:
        check_bool(at_end, "at_end")
        check_int(every_epochs, "every_epochs", 1, allow_none=True)
        check_int(randomizations, "randomizations", 0)
        check_number(swaps_per_edge, "swaps_per_edge", 0.0, low_open=True)
        check_bool(by_sign, "by_sign")
        check(
            is_list(export, lambda e: e in EXPORTS),
            "export",
            list(export) if is_list(export) else export,
            f"must be a list, each one of {EXPORTS} (e.g. [npz, edges]; [] for none)",
        )
        check_int(graphml_max_edges, "graphml_max_edges", 0)
        self.lesions = None if lesions is None else check_lesions(lesions)
        self.at_end, self.every_epochs = bool(at_end), every_epochs
        self.randomizations, self.swaps_per_edge, self.by_sign = (
            randomizations,
            float(swaps_per_edge),
            bool(by_sign),
        )
        self.export, self.graphml_max_edges = tuple(export), graphml_max_edges
        self.rows: list[dict[str, float]] = []
        self._previous = np.zeros(0, dtype=np.int64)  # edge keys (src * n + dst) at the last analysis
        self._ever = np.zeros(0, dtype=np.int64)  # edge keys present at any analysis so far
        self._out = Path("structure")  # <run dir>/structure, set by start()
        self._seed = 0

    def __repr__(self) -> str:
        return (
            f"StructureAnalysis(at_end={self.at_end}, every_epochs={self.every_epochs}, randomizations={self.randomizations}, "
            f"swaps_per_edge={self.swaps_per_edge}, by_sign={self.by_sign}, export={list(self.export)})"
        )

    # -- during training --------------------------------------------------------------------------

    def start(self, run_dir: Path | Any, seed: int) -> None:
        """The run begins: where its files go (``<run dir>/structure/``) and the seed of its null models."""
        self._out = Path(run_dir) / "structure"
        self._seed = seed

    def wants(self, epoch: int) -> bool:
        """Whether the evaluation point after ``epoch`` is analysed (every ``every_epochs`` epochs)."""
        return self.every_epochs is not None and epoch % self.every_epochs == 0

    def observe(self, epoch: int, step: int, graph: SignedGraph | None) -> None:
        """At an evaluation point the runner chose by :meth:`wants`: analyse the network's graph.

        The row also has ``churn`` (the fraction of the union of this and the last analysed edge
        set that changed between them) and ``ever_active`` (edges present at any analysis so far,
        over the possible edges). A network whose connections form no graph (None) is skipped.
        """
        if graph is None:
            return
        numbers, _ = analyse(
            graph, self.randomizations, (self._seed, epoch), self.swaps_per_edge, self.by_sign
        )
        src, dst, _ = graph.edges()
        keys = np.unique(src.astype(np.int64) * graph.num_nodes + dst)
        union = np.union1d(self._previous, keys)
        changed = len(np.setxor1d(self._previous, keys, assume_unique=True))
        self._ever = np.union1d(self._ever, keys)
        possible = possible_edges(graph)
        numbers["churn"] = changed / len(union) if self.rows and len(union) else float("nan")
        numbers["ever_active"] = len(self._ever) / possible if possible else float("nan")
        self._previous = keys
        self.rows.append({"epoch": epoch, "step": step, **numbers})
        self._write_rows()

    def state_dict(self) -> dict[str, Any]:
        """The trajectory so far (a checkpoint holds it, so a resumed run keeps every row once)."""
        return {
            "rows": [dict(r) for r in self.rows],
            "previous": torch.from_numpy(self._previous),
            "ever": torch.from_numpy(self._ever),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`start`) and rewrite the trajectory file to match."""
        self.rows = [dict(r) for r in state["rows"]]
        self._previous = state["previous"].cpu().numpy()
        self._ever = state["ever"].cpu().numpy()
        self._write_rows()

    def _write_rows(self) -> None:
        path = self._out / "trajectory.csv"
        if not self.rows:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(exist_ok=True)
        write_csv(path, self.rows)

    # -- at the end -------------------------------------------------------------------------------

    def finish(self, graph: SignedGraph | None, label: str = "network") -> tuple[dict[str, Any], list[Path]]:
        """Analyse the final network's graph; returns the summary headline and the files written."""
        paths: list[Path] = []
        if self.rows and len(self.rows) > 1:
            paths.append(plot_trajectory(pd.DataFrame(self.rows), self._out / "trajectory.png"))
        if not self.at_end:
            return {}, paths
        if graph is None:
            return {"skipped": "the network's connections do not form a graph the analysis reads"}, paths
        # epochs count from 1, so (seed, 0) is the end of the run
        numbers, profile = analyse(
            graph, self.randomizations, (self._seed, 0), self.swaps_per_edge, self.by_sign
        )
        paths += self.write(graph, numbers, profile, self._out, label)
        return {k: numbers[k] for k in HEADLINE if k in numbers} | {
            "randomizations": self.randomizations
        }, paths

    def lesion(
        self, model: torch.nn.Module, graph: SignedGraph | None, evaluate: Callable[[], Mapping[str, float]]
    ) -> tuple[dict[str, Any], list[Path]]:
        """The motif lesions of the final network (``lesions``), into ``structure/lesions.csv``; the headline."""
        if self.lesions is None:
            return {}, []
        if graph is None or graph.kind != "layered":
            return {"skipped": "lesions read an MLP's layered graph"}, []
        headline, path = run_lesions(model, graph, evaluate, self.lesions, (self._seed, 0), self._out)
        return headline, [path]

    def write(
        self,
        graph: SignedGraph,
        numbers: Mapping[str, float],
        profile: MotifProfile | None,
        out: Path,
        label: str = "network",
    ) -> list[Path]:
        """Write one analysis into ``out``: profile table, numbers, picture, graph files."""
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "profile.json", out / "topology.json"]
        # every number a float, counts too
        atomic_write_json(paths[0], json_plain({k: float(v) for k, v in numbers.items()}))
        atomic_write_json(paths[1], json_plain(dataclasses.asdict(layer_stats(graph))))
        if profile is not None:
            profile.table().to_csv(out / "profile.csv")
            paths += [out / "profile.csv", plot_profile({label: profile}, out / "profile.png")]
        for kind in self.export:
            if kind == "graphml" and graph.num_edges > self.graphml_max_edges:
                log.warning(
                    "graph.graphml skipped: %d edges > analysis.graphml_max_edges=%d (graph.npz and graph.edges "
                    "scale)",
                    graph.num_edges,
                    self.graphml_max_edges,
                )
                continue
            paths.append(write_graph(graph, out / f"graph.{kind}"))
        return paths
