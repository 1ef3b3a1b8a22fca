"""Out-of-core expression: reading rows in chunks, streamed pseudobulks, and the streamed loader.

Data larger than memory stay where the existing engines keep them: an AnnData opened with
``anndata.read_h5ad(path, backed="r")`` (its ``X`` is an on-disk CSR matrix or HDF5 array) or a
TileDB-SOMA experiment opened with :func:`perturbscope.data.read_soma` (its ``X`` reads rows
from the SOMA store). Both are an :class:`~anndata.AnnData` whose labels (``obs``, ``obsm``) are in
memory and whose expression is read by rows on demand; scvi-tools registers them as usual.

* **Reading.** Rows are read in contiguous chunks (:func:`iter_row_chunks`): a slice of rows is
  one read on HDF5 and on TileDB, while a random row is a seek each.
* **Pseudobulk.** :func:`streamed_pseudobulk` adds each chunk's log1p-normalised rows to its
  group's sums in file order, which reproduces :func:`perturbscope.data.pseudobulk` of the whole
  matrix bit for bit (its sparse indicator product also adds the cells of a group in order).
* **Training.** :class:`StreamedDataSplitter` is a :class:`~scvi.dataloaders.DataSplitter`
  whose loaders read *blocks* of ``chunk_size`` consecutive rows, visit the blocks in a random
  order and shuffle rows within a buffer of ``buffer_chunks`` blocks ("block shuffling", as
  AnnLoader-style and scvi-tools' TileDB loaders do). The trade-off: a minibatch mixes cells of
  at most ``buffer_chunks`` blocks rather than of the whole data set, so a file sorted by
  perturbation gives less varied minibatches than a full shuffle; a larger buffer mixes more
  and costs ``buffer_chunks * chunk_size`` rows of memory. Anchors come from a bounded control
  bank (:class:`~perturbscope.data.StreamedControlBank`). Under DDP each rank takes a disjoint,
  equal share of every epoch's block order.
"""

from __future__ import annotations

from collections.abc import Iterator

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi import settings
from scvi.data import AnnDataManager
from scvi.dataloaders import DataSplitter

from .._constants import REGISTRY_KEYS
from ._control_bank import StreamedControlBank
from ._pairing import control_mask, distributed_rank, registered_pairing_groups, registered_tensors
from ._pseudobulk import DataScale, check_groups_labelled, log1p_expression
from ._rows import CHUNK_SIZE, iter_row_chunks, read_block, row_blocks

#: Blocks of ``CHUNK_SIZE`` rows whose rows are shuffled together during training.
BUFFER_CHUNKS = 8
#: Loader options of :class:`~scvi.dataloaders.AnnDataLoader` that have no meaning for a
#: streamed loader (no worker processes, nothing to pin); accepted and ignored.
_IGNORED_LOADER_OPTIONS = ("num_workers", "persistent_workers", "pin_memory", "drop_dataset_tail")


def streamed_pseudobulk(
    matrix,
    obs: pd.DataFrame,
    groupby: list[str],
    data_scale: DataScale = "counts",
    chunk_size: int = CHUNK_SIZE,
) -> tuple[pd.DataFrame, pd.Series]:
    """Group means of log1p-normalised expression and group sizes, in one pass over row chunks.

    Equal, bit for bit, to :func:`perturbscope.data.pseudobulk` of
    :func:`perturbscope.data.log1p_expression` of the whole matrix (same group order, same
    values): each chunk is normalised by the same function, row by row, and its rows are added
    to their group's sums in file order, as the in-memory sparse indicator product adds them.
    Memory: one chunk plus the groups x genes sums.

    Parameters
    ----------
    matrix
        Cells x genes, in memory or out of core (:func:`is_out_of_core`).
    obs
        One row per cell with the ``groupby`` columns.
    groupby
        Columns whose observed combinations are the groups.
    data_scale
        Scale of ``matrix``, as for :func:`perturbscope.data.log1p_expression`.
    chunk_size
        Rows read at a time.

    Returns
    -------
    ``(means, counts)``: groups x genes means (columns ``0..n_genes-1``; index as
    :func:`~perturbscope.data.pseudobulk`'s, a ``MultiIndex`` for several columns) and the number
    of cells per group (same index).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> obs = pd.DataFrame({"g": ["x", "y", "x"]})
    >>> means, counts = streamed_pseudobulk(np.array([[1.0], [5], [3]]), obs, ["g"], "log1p_norm", 2)
    >>> means.to_numpy().ravel().tolist(), counts.tolist()
    ([2.0, 5.0], [2, 1])
    """
    if len(obs) != matrix.shape[0]:
        raise ValueError(f"obs has {len(obs)} rows but the matrix has {matrix.shape[0]} cells.")
    check_groups_labelled(obs, list(groupby), "obs")
    labels = obs[list(groupby)].astype(str)
    codes, uniques = pd.MultiIndex.from_frame(labels).factorize(sort=True)
    sums = np.zeros((len(uniques), matrix.shape[1]), dtype=np.float64)
    for start, rows in iter_row_chunks(matrix, chunk_size):
        # the chunk keeps its cells' names, so an error (a cell without counts) names the right cells
        names = obs.index[start : start + rows.shape[0]].astype(str)
        values = log1p_expression(ad.AnnData(X=rows, obs=pd.DataFrame(index=names)), None, data_scale)
        # unbuffered, in row order: the same additions, in the same order, as the indicator product
        np.add.at(sums, codes[start : start + len(values)], values)
    counts = np.bincount(codes, minlength=len(uniques))
    means = sums / counts.astype(np.float64)[:, None]
    if len(groupby) > 1:
        index = pd.MultiIndex.from_tuples(list(uniques), names=list(groupby))
    else:
        index = pd.Index(uniques.get_level_values(0), name=groupby[0])
    return pd.DataFrame(means, index=index), pd.Series(counts, index=index, name="n_cells")


class StreamedAnnDataLoader:
    """Minibatches read in blocks of consecutive rows, each row with a control anchor.

    Yields the same keys and dtypes as :class:`~perturbscope.data.AnchoredAnnDataLoader`.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    indices
        Cells to iterate over.
    shuffle
        Visit blocks in a new random order each pass and shuffle rows within a buffer of blocks.
    batch_size
        Minibatch size (per rank under distributed training).
    drop_last
        Drop the last incomplete minibatch.
    control_bank
        Anchors' expression (and the pairing group of every cell); built here when ``None``.
    tensors
        The registered tensors but the expression, of every cell
        (``registered_tensors``); read here when ``None``.
        :class:`StreamedDataSplitter` reads them once and shares them between its loaders.
    chunk_size
        Rows per block.
    buffer_chunks
        Blocks whose rows are shuffled together.
    distributed_sampler
        Under ``torch.distributed``, keep this rank's share of each pass.
    seed
        Seed of block orders and anchors; ``scvi.settings.seed`` when ``None``.
    **kwargs
        ``num_workers``, ``persistent_workers``, ``pin_memory``, ``load_sparse_tensor`` and
        ``drop_dataset_tail`` are accepted and ignored (batches are dense, read in this process).
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        indices=None,
        shuffle: bool = False,
        batch_size: int = 128,
        drop_last: bool = False,
        control_bank: StreamedControlBank | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
        chunk_size: int = CHUNK_SIZE,
        buffer_chunks: int = BUFFER_CHUNKS,
        distributed_sampler: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - {"load_sparse_tensor", *_IGNORED_LOADER_OPTIONS})
        if unknown:
            raise TypeError(f"StreamedAnnDataLoader got unexpected keyword arguments {unknown}.")
        if int(chunk_size) < 1 or int(buffer_chunks) < 1 or int(batch_size) < 1:
            raise ValueError(
                f"chunk_size, buffer_chunks and batch_size must be positive integers, got {chunk_size!r}, "
                f"{buffer_chunks!r} and {batch_size!r}."
            )
        n_obs = adata_manager.adata.n_obs
        self.indices = np.arange(n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        self.matrix = adata_manager.get_from_registry(SCVI_KEYS.X_KEY)
        self.batch_size, self.chunk_size, self.buffer_chunks = int(batch_size), int(chunk_size), int(buffer_chunks)
        self.shuffle, self.drop_last = shuffle, drop_last
        distributed = distributed_sampler and torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = distributed_rank() if distributed else 0
        self.world_size = torch.distributed.get_world_size() if distributed else 1
        self.seed = int(settings.seed or 0) if seed is None else int(seed)
        self.epoch = 0
        # Labels and covariates are in memory: one tensor per key for every cell.
        self.tensors = registered_tensors(adata_manager) if tensors is None else tensors
        if control_bank is None:
            groups, _ = registered_pairing_groups(adata_manager)
            control_bank = StreamedControlBank(self.matrix, groups, control_mask(adata_manager),
                                               seed=self.seed, chunk_size=self.chunk_size)
        if len(control_bank.groups) != n_obs:
            raise ValueError(f"control_bank holds the pairing groups of {len(control_bank.groups)} cells, "
                             f"but the AnnData has {n_obs}.")
        self.control_bank = control_bank
        self.groups = control_bank.groups  # the pairing group of every cell, held once by the bank
        self.anchor_sampler = control_bank.sampler(seed=self.seed + self.rank)

    @property
    def n_rows(self) -> int:
        """Rows this rank visits per pass (equal shares under distributed training)."""
        return len(self.indices) // self.world_size if self.world_size > 1 else len(self.indices)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n_rows // self.batch_size
        return -(-self.n_rows // self.batch_size)

    def _block_order(self) -> list[np.ndarray]:
        """This pass's blocks of rows, in visiting order (this rank's share only)."""
        blocks = row_blocks(self.indices, self.chunk_size)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])  # the same order on every rank
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        if self.world_size == 1 or not blocks:
            return blocks
        # a contiguous, equal share of the visiting order per rank; the tail that does not divide
        # evenly is skipped this pass (a different one each pass when shuffling)
        start = self.rank * self.n_rows
        share = np.concatenate(blocks)[start : start + self.n_rows]
        return [np.sort(p) for p in np.split(share, _cut_points(blocks, self.rank * self.n_rows, self.n_rows)) if len(p)]

    def _buffers(self) -> Iterator[tuple[np.ndarray, object]]:
        """``(rows, expression)`` per buffer of ``buffer_chunks`` blocks, shuffled within."""
        blocks = self._block_order()
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        for first in range(0, len(blocks), self.buffer_chunks):
            group = blocks[first : first + self.buffer_chunks]
            values = [read_block(self.matrix, rows) for rows in group]
            rows = np.concatenate(group)
            values = sparse.vstack(values, format="csr") if sparse.issparse(values[0]) else np.concatenate(values)
            if self.shuffle:
                order = rng.permutation(len(rows))
                rows, values = rows[order], values[order]
            yield rows, values

    def _batch(self, rows: np.ndarray, values) -> dict[str, torch.Tensor]:
        dense = values.toarray() if sparse.issparse(values) else np.asarray(values)
        batch = {SCVI_KEYS.X_KEY: torch.as_tensor(dense, dtype=torch.float32)}
        index = torch.from_numpy(rows)
        batch.update({key: tensor[index] for key, tensor in self.tensors.items()})
        batch[REGISTRY_KEYS.ANCHOR_X_KEY] = self.control_bank.expression(
            self.anchor_sampler.sample(self.groups[rows])
        )
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pending_rows, pending = np.empty(0, dtype=np.int64), None
        emitted = 0
        for rows, values in self._buffers():
            if pending is not None and len(pending_rows):
                rows = np.concatenate([pending_rows, rows])
                values = sparse.vstack([pending, values], format="csr") if sparse.issparse(values) \
                    else np.concatenate([pending, values])
            n_full = len(rows) // self.batch_size * self.batch_size
            for start in range(0, n_full, self.batch_size):
                yield self._batch(rows[start : start + self.batch_size], values[start : start + self.batch_size])
                emitted += 1
            pending_rows, pending = rows[n_full:], values[n_full:]
        if len(pending_rows) and not self.drop_last and emitted < len(self):
            yield self._batch(pending_rows, pending)
        self.epoch += 1


def _cut_points(blocks: list[np.ndarray], start: int, length: int) -> np.ndarray:
    """Where block boundaries fall inside the window ``[start, start + length)`` of the order."""
    ends = np.cumsum([len(b) for b in blocks])[:-1] - start
    return ends[(ends > 0) & (ends < length)]


class StreamedDataSplitter(DataSplitter):
    """A :class:`~scvi.dataloaders.DataSplitter` whose loaders stream rows from disk in blocks.

    For an AnnData opened with ``backed="r"`` or read from TileDB-SOMA with
    :func:`perturbscope.data.read_soma`. Splitting into training, validation and test cells is
    scvi-tools' own (``external_indexing`` included); one bounded control bank and one copy of
    the registered labels and covariates are built once and shared by the loaders.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    train_size, validation_size, shuffle_set_split, load_sparse_tensor, pin_memory, \
external_indexing
        As for :class:`~scvi.dataloaders.DataSplitter` (batches are always dense).
    chunk_size
        Rows per block read from disk.
    buffer_chunks
        Blocks whose rows are shuffled together.
    max_controls_per_group
        Bound of the control bank per pairing group
        (:class:`~perturbscope.data.StreamedControlBank`).
    seed
        Seed of the bank, the block orders and the anchors; ``scvi.settings.seed`` when ``None``.
    **kwargs
        ``batch_size``, ``drop_last``, ``distributed_sampler`` and the loader options of
        :class:`StreamedAnnDataLoader`.

    Examples
    --------
    >>> import perturbscope as ps
    >>> adata, emb = ps.data.simulate_perturbseq(n_genes=30, n_perturbed_genes=6,
    ...                                          n_combinations=2, n_cells_per_condition=10)
    >>> ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=emb, context_key="cell_type")
    >>> model = ps.ScopeVI(adata, n_latent=4, n_hidden=16, effect_prior=False)
    >>> splitter = StreamedDataSplitter(model.adata_manager, batch_size=32, chunk_size=50)
    >>> splitter.setup()
    >>> batch = next(iter(splitter.train_dataloader()))
    >>> sorted(batch), tuple(batch["anchor_X"].shape)
    (['X', 'anchor_X', 'batch', 'context', 'perturbation_genes'], (32, 30))
    """

    data_loader_cls = StreamedAnnDataLoader

    def __init__(
        self,
        adata_manager: AnnDataManager,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        pin_memory: bool = False,
        external_indexing: list[np.ndarray] | None = None,
        chunk_size: int = CHUNK_SIZE,
        buffer_chunks: int = BUFFER_CHUNKS,
        max_controls_per_group: int | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(
            adata_manager, train_size=train_size, validation_size=validation_size,
            shuffle_set_split=shuffle_set_split, load_sparse_tensor=load_sparse_tensor, pin_memory=pin_memory,
            external_indexing=external_indexing, **kwargs,
        )
        seed = int(settings.seed or 0) if seed is None else int(seed)
        groups, _ = registered_pairing_groups(adata_manager)
        bank_options = {} if max_controls_per_group is None else {"max_per_group": int(max_controls_per_group)}
        self.control_bank = StreamedControlBank(
            adata_manager.get_from_registry(SCVI_KEYS.X_KEY), groups, control_mask(adata_manager),
            seed=seed, chunk_size=int(chunk_size), **bank_options,
        )
        self.tensors = registered_tensors(adata_manager)
        self.data_loader_kwargs.update(
            control_bank=self.control_bank, tensors=self.tensors, chunk_size=int(chunk_size),
            buffer_chunks=int(buffer_chunks), seed=seed,
        )

