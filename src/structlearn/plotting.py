"""The one way the package makes a matplotlib figure: :func:`figure`, for pictures written to files.

Every plot (reports, motif profiles, method artefacts, the URN read-out) is drawn on a
:class:`matplotlib.figure.Figure` made here rather than through ``pyplot``: nothing global changes
(no ``matplotlib.use``, so an interactive session keeps its backend; no pyplot list of open
figures, so nothing needs closing and a figure is freed like any object), ``savefig`` renders PNG
with Agg whatever the session's backend, and plotting works from threads and without a display.
matplotlib is imported on the first call, so importing a module that can plot costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def figure(**kwargs: Any) -> Figure:
    """A new figure for ``savefig``, outside pyplot.

    Use ``fig.subplots(...)`` (as ``plt.subplots``) or ``fig.add_subplot()`` for the axes, and
    ``matplotlib.colormaps[name]`` for colour maps.

    Args:
        **kwargs: :class:`matplotlib.figure.Figure` arguments (``figsize``, ``layout``, ``dpi``...).
    """
    from matplotlib.figure import Figure

    return Figure(**kwargs)
