"""Control-cell anchoring: who is paired with whom during training.

Every training cell (perturbed or control) is paired with a control cell drawn uniformly from the
control cells of its *pairing group*: the same context (``context_key``) and batch
(``batch_key``). The draw happens each time a minibatch is produced, so the pairing is resampled
on every epoch and a perturbed cell sees many anchors over training. Pairing within the group
keeps the anchor's cell type and batch identical to the perturbed cell's, so the conditional prior
learns the perturbation's effect rather than the difference between contexts.

This is built on scvi-tools' extension points: :class:`AnchoredAnnDataLoader` is an
:class:`~scvi.dataloaders.AnnDataLoader` that adds the registry key ``anchor_X`` to each batch,
and :class:`AnchoredDataSplitter` is a :class:`~scvi.dataloaders.DataSplitter` whose
``data_loader_cls`` is that loader (the model sets it as ``_data_splitter_cls``), so the standard
``TrainingPlan``/``TrainRunner`` loop is used unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi import settings
from scvi.data import AnnDataManager
from scvi.dataloaders import AnnDataLoader, DataSplitter

from .._constants import REGISTRY_KEYS

#: Control cells are held densely in memory for anchoring when they take at most this much.
MAX_CACHE_BYTES = 512 * 2**20


def pairing_groups(context: np.ndarray, batch: np.ndarray, n_batch: int) -> np.ndarray:
    """Integer pairing group (context x batch) from registered context and batch codes."""
    return np.asarray(context).ravel().astype(int) * n_batch + np.asarray(batch).ravel().astype(int)


def registered_pairing_groups(adata_manager: AnnDataManager) -> tuple[np.ndarray, int]:
    """Pairing group of every registered cell, and the number of batch codes."""
    context = adata_manager.get_from_registry(REGISTRY_KEYS.CONTEXT_KEY)
    batch = adata_manager.get_from_registry(SCVI_KEYS.BATCH_KEY)
    n_batch = int(np.asarray(batch).max()) + 1
    return pairing_groups(context, batch, n_batch), n_batch


def registered_tensors(adata_manager: AnnDataManager, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every registered tensor but the expression, for every cell, on ``device``.

    Read through scvi-tools' own dataset, so that the dtypes are those of the default loader's
    batches; the streamed and the device-resident loaders index them by cell.
    """
    keys = [key for key in adata_manager.data_registry if key != SCVI_KEYS.X_KEY]
    every = adata_manager.create_torch_dataset(data_and_attributes=keys)[np.arange(adata_manager.adata.n_obs)]
    return {key: torch.as_tensor(np.asarray(value), device=device) for key, value in every.items()}


def control_mask(adata_manager: AnnDataManager) -> np.ndarray:
    """Boolean mask of control cells (an empty perturbation set)."""
    genes = np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.PERTURBATION_KEY))
    return (genes < 0).all(axis=1)


class ControlBank:
    """Control cells ordered by pairing group, with each group's offset and size in that order.

    A cell's anchor is ``cells[offsets[g] + k]`` with ``k`` uniform in ``[0, counts[g])``: one
    vectorised draw for a whole minibatch, shared by :class:`ControlAnchorSampler` (NumPy) and
    :class:`perturbscope.data.DeviceDataSplitter` (torch, on the accelerator).

    Parameters
    ----------
    groups
        Pairing group of every cell of the AnnData.
    is_control
        Control mask over the same cells.

    Examples
    --------
    >>> bank = ControlBank(np.array([5, 5, 7, 7, 5]), np.array([True, False, True, True, True]))
    >>> bank.group_ids.tolist(), bank.cells.tolist(), bank.offsets.tolist(), bank.counts.tolist()
    ([5, 7], [0, 4, 2, 3], [0, 2], [2, 2])
    >>> bank.positions(np.array([7, 5])).tolist()
    [1, 0]
    """

    def __init__(self, groups: np.ndarray, is_control: np.ndarray):
        groups = np.asarray(groups).ravel().astype(np.int64)
        is_control = np.asarray(is_control, dtype=bool).ravel()
        if groups.shape != is_control.shape:
            raise ValueError(
                f"groups and is_control must have one entry per cell, got {groups.shape[0]} and "
                f"{is_control.shape[0]}."
            )
        self.group_ids = np.unique(groups)
        controls = np.flatnonzero(is_control)
        order = np.argsort(groups[controls], kind="stable")
        self.cells = controls[order]
        sorted_groups = groups[self.cells]
        self.offsets = np.searchsorted(sorted_groups, self.group_ids, side="left")
        self.counts = np.searchsorted(sorted_groups, self.group_ids, side="right") - self.offsets

    def positions(self, groups: np.ndarray) -> np.ndarray:
        """Position of each group in ``group_ids``; ``ValueError`` for a group without controls."""
        groups = np.asarray(groups).ravel().astype(np.int64)
        position = np.searchsorted(self.group_ids, groups).clip(max=max(len(self.group_ids) - 1, 0))
        known = (self.group_ids[position] == groups) if len(self.group_ids) else np.zeros(len(groups), bool)
        empty = ~known
        empty[known] = self.counts[position[known]] == 0
        if empty.any():
            raise ValueError(f"Pairing group {groups[empty][0]} has no control cells to anchor on.")
        return position


class ControlAnchorSampler:
    """Draw, for each cell, a random control cell from the same pairing group.

    The draw is exactly uniform over the group's control cells (one vectorised
    :meth:`numpy.random.Generator.integers` call per minibatch, no loop over groups).

    Parameters
    ----------
    groups
        Pairing group of every cell of the AnnData.
    is_control
        Control mask over the same cells.
    seed
        Seed of the sampler's generator.

    Examples
    --------
    >>> sampler = ControlAnchorSampler(np.array([0, 0, 1, 1]), np.array([True, False, True, False]))
    >>> sampler.sample(np.array([0, 1, 1])).tolist()
    [0, 2, 2]
    """

    def __init__(self, groups: np.ndarray, is_control: np.ndarray, seed: int = 0):
        self.bank = ControlBank(groups, is_control)
        self.rng = np.random.default_rng(seed)

    def sample(self, groups: np.ndarray) -> np.ndarray:
        """One random control cell (index into the full AnnData) per entry of ``groups``."""
        position = self.bank.positions(groups)
        draw = self.rng.integers(0, self.bank.counts[position]) if len(position) else position
        return self.bank.cells[self.bank.offsets[position] + draw]


def distributed_rank() -> int:
    """This process's rank under ``torch.distributed`` (0 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


class AnchoredAnnDataLoader(AnnDataLoader):
    """An :class:`~scvi.dataloaders.AnnDataLoader` whose batches carry a control anchor.

    Each yielded batch has the usual registry tensors plus ``anchor_X``: the expression of one
    control cell per row, drawn from that row's pairing group and redrawn on every pass.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    indices
        Cells to iterate over.
    seed
        Seed of the anchor sampler; ``scvi.settings.seed`` when ``None``.
    **kwargs
        Passed to :class:`~scvi.dataloaders.AnnDataLoader`.
    """

    def __init__(self, adata_manager: AnnDataManager, indices=None, seed: int | None = None, **kwargs):
        super().__init__(adata_manager, indices=indices, **kwargs)
        groups, self.n_batch = registered_pairing_groups(adata_manager)
        seed = (int(settings.seed or 0) if seed is None else seed) + distributed_rank()
        self.anchor_sampler = ControlAnchorSampler(groups, control_mask(adata_manager), seed=seed)
        self.anchor_dataset = adata_manager.create_torch_dataset(
            data_and_attributes={SCVI_KEYS.X_KEY: np.float32}
        )
        self.anchor_cache, self.cache_position = self._dense_control_cache(adata_manager)

    def _dense_control_cache(self, adata_manager: AnnDataManager):
        """Control cells as one dense tensor when they fit in ``MAX_CACHE_BYTES``.

        Anchors are read on every step; gathering rows of a dense tensor is much cheaper than
        slicing and densifying a sparse matrix each time.
        """
        controls = np.flatnonzero(control_mask(adata_manager))
        if len(controls) * adata_manager.summary_stats.n_vars * 4 > MAX_CACHE_BYTES:
            return None, None
        dense = torch.as_tensor(self.anchor_dataset[controls][SCVI_KEYS.X_KEY])
        position = np.full(adata_manager.adata.n_obs, -1, dtype=np.int64)
        position[controls] = np.arange(len(controls))
        return dense, position

    def _anchor_expression(self, anchors: np.ndarray) -> torch.Tensor:
        if self.anchor_cache is not None:
            return self.anchor_cache[torch.from_numpy(self.cache_position[anchors])]
        # scvi-tools' dataset reads a backed AnnData's rows in sorted order (and h5py refuses
        # repeats): read each anchor once, in order, and gather them back into the batch's order
        unique, inverse = np.unique(anchors, return_inverse=True)
        rows = torch.as_tensor(self.anchor_dataset[unique][SCVI_KEYS.X_KEY])
        return rows[torch.from_numpy(inverse.reshape(-1))]

    def __iter__(self):
        for batch in super().__iter__():
            groups = pairing_groups(
                batch[REGISTRY_KEYS.CONTEXT_KEY].numpy(), batch[SCVI_KEYS.BATCH_KEY].numpy(), self.n_batch
            )
            anchors = self.anchor_sampler.sample(groups)
            batch[REGISTRY_KEYS.ANCHOR_X_KEY] = self._anchor_expression(anchors)
            yield batch


class AnchoredDataSplitter(DataSplitter):
    """A :class:`~scvi.dataloaders.DataSplitter` whose loaders add control anchors."""

    data_loader_cls = AnchoredAnnDataLoader
