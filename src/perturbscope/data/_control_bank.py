"""A bounded bank of control cells for anchoring when the expression is read from disk.

In memory, every training cell is paired with a control cell drawn uniformly from *all* control
cells of its pairing group (context x batch; :mod:`perturbscope.data._pairing`). Out of core,
that would be a random disk read per minibatch row. :class:`StreamedControlBank` instead keeps,
per pairing group, a uniform random sample without replacement of at most ``max_per_group``
control cells, read once, in file order, in one streamed pass of row blocks, and held densely in
memory. This is the sample a reservoir would keep; because the labels are in memory the cells
are chosen from them first and only their rows are read. Its size is bounded by
``n_groups * max_per_group * n_genes * 4`` bytes whatever the number of cells; anchors are then
drawn uniformly from the bank by :class:`~perturbscope.data.ControlAnchorSampler`, so each
group's anchors are a uniform draw from a uniform sample of its controls.
"""

from __future__ import annotations

import numpy as np
import torch

from ._pairing import ControlAnchorSampler
from ._rows import CHUNK_SIZE, take_rows

#: Default bound of the control bank per pairing group.
MAX_CONTROLS_PER_GROUP = 2048


def bounded_control_sample(
    groups: np.ndarray, is_control: np.ndarray, max_per_group: int = MAX_CONTROLS_PER_GROUP, seed: int = 0
) -> np.ndarray:
    """Sorted indices of at most ``max_per_group`` control cells per pairing group, drawn uniformly.

    Parameters
    ----------
    groups
        Pairing group of every cell.
    is_control
        Control mask over the same cells.
    max_per_group
        Bound per group; a group with fewer controls keeps them all.
    seed
        Seed of the draw.

    Returns
    -------
    Sorted cell indices.

    Examples
    --------
    >>> import numpy as np
    >>> cells = bounded_control_sample(np.array([0, 0, 0, 1, 1]), np.array([1, 1, 1, 0, 1], bool), 2)
    >>> len(cells), int(cells[-1])
    (3, 4)
    """
    if int(max_per_group) < 1:
        raise ValueError(f"max_per_group must be a positive integer, got {max_per_group!r}.")
    groups = np.asarray(groups).ravel()
    controls = np.flatnonzero(np.asarray(is_control, dtype=bool).ravel())
    rng = np.random.default_rng(seed)
    kept = []
    for group in np.unique(groups[controls]):
        pool = controls[groups[controls] == group]
        kept.append(pool if len(pool) <= max_per_group else rng.choice(pool, int(max_per_group), replace=False))
    return np.sort(np.concatenate(kept)) if kept else np.empty(0, dtype=np.int64)


class StreamedControlBank:
    """The expression of a bounded uniform sample of control cells per pairing group.

    Parameters
    ----------
    matrix
        Cells x genes, in memory or out of core (an on-disk CSR matrix or HDF5 array).
    groups
        Pairing group of every cell.
    is_control
        Control mask over the same cells.
    max_per_group
        Bound per pairing group (:data:`MAX_CONTROLS_PER_GROUP` by default).
    seed
        Seed of the sample.
    chunk_size
        Rows per block of the streamed read.

    Attributes
    ----------
    cells
        Sorted indices of the banked control cells.
    X
        Their dense float32 expression, ``(len(cells), n_genes)``.

    Examples
    --------
    >>> import numpy as np
    >>> bank = StreamedControlBank(np.arange(12.0).reshape(6, 2), np.array([0, 0, 0, 1, 1, 1]),
    ...                            np.array([1, 1, 0, 1, 0, 0], bool), max_per_group=1)
    >>> len(bank.cells), bank.group_sizes()
    (2, {0: 1, 1: 1})
    >>> bank.expression(np.array([3])).tolist()
    [[6.0, 7.0]]
    """

    def __init__(self, matrix, groups: np.ndarray, is_control: np.ndarray,
                 max_per_group: int = MAX_CONTROLS_PER_GROUP, seed: int = 0, chunk_size: int = CHUNK_SIZE):
        self.groups = np.asarray(groups).ravel()
        self.cells = bounded_control_sample(self.groups, is_control, max_per_group, seed)
        self.max_per_group = int(max_per_group)
        self.mask = np.zeros(len(self.groups), dtype=bool)
        self.mask[self.cells] = True
        self.X = torch.as_tensor(take_rows(matrix, self.cells, chunk_size))

    def sampler(self, seed: int) -> ControlAnchorSampler:
        """A :class:`~perturbscope.data.ControlAnchorSampler` over the banked cells."""
        return ControlAnchorSampler(self.groups, self.mask, seed=seed)

    def expression(self, cells: np.ndarray) -> torch.Tensor:
        """Dense expression of banked ``cells`` (indices into the AnnData)."""
        position = np.searchsorted(self.cells, np.asarray(cells))
        return torch.index_select(self.X, 0, torch.from_numpy(position))

    def group_sizes(self) -> dict[int, int]:
        """Banked control cells per pairing group."""
        values, counts = np.unique(self.groups[self.cells], return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    @property
    def nbytes(self) -> int:
        """Memory held by the bank's expression."""
        return int(self.X.element_size() * self.X.nelement())
