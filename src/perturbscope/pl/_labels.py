"""Point labels that do not overlap: adjustText when installed, else a greedy placement.

The greedy placement tries eight offsets around each point, in order of the label's priority,
and keeps the first whose text box overlaps no label already placed and stays inside the axes;
a label with no free spot is left out (the caller says how many were drawn). adjustText, when
installed (the optional extra ``pip install "perturbscope[plot]"``), moves every label instead
and draws a connector line.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.text import Text

#: Offsets (points) tried around each point, nearest first.
OFFSETS = ((4, 4), (4, -10), (-4, 4), (-4, -10), (0, 9), (0, -14), (10, 0), (-10, 0))


def has_adjust_text() -> bool:
    """Whether the optional package ``adjustText`` is installed."""
    return importlib.util.find_spec("adjustText") is not None


def place_labels(
    ax: Axes,
    x: Sequence[float],
    y: Sequence[float],
    texts: Sequence[str],
    fontsize: float = 7,
    use_adjust_text: bool | None = None,
) -> list[Text]:
    """Write ``texts`` beside the points ``(x, y)`` (in priority order) without overlaps.

    Parameters
    ----------
    ax
        The axes; its limits should be final.
    x, y
        Point coordinates in data units.
    texts
        One label per point, the most important first.
    fontsize
        Font size in points.
    use_adjust_text
        Use adjustText; ``None`` uses it when it is installed.

    Returns
    -------
    The text artists drawn (fewer than ``texts`` when the greedy placement left some out).

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> fig, ax = plt.subplots()
    >>> _ = ax.set(xlim=(0, 2), ylim=(0, 2))
    >>> drawn = place_labels(ax, [0.5, 0.5, 1.5], [0.5, 0.5, 1.5], ["a", "b", "c"],
    ...                      use_adjust_text=False)
    >>> [t.get_text() for t in drawn]
    ['a', 'b', 'c']
    >>> bool(drawn[0].get_window_extent().overlaps(drawn[1].get_window_extent()))
    False
    """
    if use_adjust_text is None:
        use_adjust_text = has_adjust_text()
    if use_adjust_text:
        from adjustText import adjust_text

        artists = [ax.text(xi, yi, t, fontsize=fontsize) for xi, yi, t in zip(x, y, texts)]
        adjust_text(artists, ax=ax, arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5})
        return artists
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed: list = []
    drawn = []
    for xi, yi, text in zip(x, y, texts):
        for dx, dy in OFFSETS:
            artist = ax.annotate(text, (xi, yi), xytext=(dx, dy), textcoords="offset points",
                                 fontsize=fontsize)
            box = artist.get_window_extent(renderer)
            inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1
                      and box.y0 >= frame.y0 and box.y1 <= frame.y1)
            if inside and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                drawn.append(artist)
                break
            artist.remove()
    return drawn


def priority(values: np.ndarray) -> np.ndarray:
    """Indices of ``values`` from the largest to the smallest (NaN last)."""
    values = np.nan_to_num(np.asarray(values, dtype=float), nan=-np.inf)
    return np.argsort(-values, kind="stable")
