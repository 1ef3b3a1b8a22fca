"""Device-resident training data: minibatches and control anchors drawn on the accelerator.

:class:`DeviceDataSplitter` copies, once, everything a ScopeVAE minibatch needs onto the training
device: the expression matrix (dense, or CSR when dense would not fit), every other registered
tensor (perturbation gene indices, context, batch, covariates) and the control bank of
:class:`~perturbscope.data.ControlBank` (control cells ordered by pairing group, with each
group's offset and size). A minibatch is then a few gathers on the device: a permutation from a
device generator gives the rows; each row's anchor is ``bank[offset[g] + floor(u * count[g])]``
with ``u`` uniform in float64, i.e. uniform over the control cells of the row's pairing group
(context x batch), exactly as the default :class:`~perturbscope.data.AnchoredAnnDataLoader`
draws it. No per-batch work happens on the host.

It stays inside scvi-tools' training loop: it is a :class:`~scvi.dataloaders.DataSplitter`
(so ``train_size``, ``validation_size``, ``shuffle_set_split`` and ``external_indexing`` split the
cells exactly as scvi-tools does) whose ``train_dataloader()``/``val_dataloader()``/
``test_dataloader()`` return iterables of dict batches with the same keys and dtypes as the
default loader. Under Lightning DDP every rank holds the whole data, takes its shard of one
shared permutation per epoch, and draws anchors with its own seed from the whole pairing group.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi import settings
from scvi.data import AnnDataManager
from scvi.dataloaders import DataSplitter

from .._constants import REGISTRY_KEYS
from ._pairing import (
    ControlBank,
    control_mask,
    distributed_rank,
    registered_pairing_groups,
    registered_tensors,
)
from ._rows import is_out_of_core, out_of_core_source

#: Data-loader options of :class:`~scvi.dataloaders.AnnDataLoader` that have no meaning here
#: (there are no worker processes and nothing to pin); they are accepted and ignored.
_IGNORED_LOADER_OPTIONS = ("num_workers", "persistent_workers", "pin_memory", "drop_dataset_tail")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the first CUDA device when there is one, else the CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, available RAM otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` in the largest binary unit that keeps it at least 1 (``"1.50 GiB"``).

    Examples
    --------
    >>> format_bytes(1536), format_bytes(3 * 2**30), format_bytes(12)
    ('1.50 KiB', '3.00 GiB', '12 B')
    """
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if n_bytes >= 1024**power:
            return f"{n_bytes / 1024**power:.2f} {unit}"
    return f"{int(n_bytes)} B"


def _registered_width(value, n_obs: int) -> int:
    """Columns of a registered field (a sparse protein or ATAC matrix too), held densely on the device."""
    if sp.issparse(value) or (hasattr(value, "shape") and len(value.shape) == 2):
        return int(value.shape[1])
    return int(np.asarray(value).reshape(n_obs, -1).shape[1])


def _expression_bytes(matrix, dense: bool) -> int:
    n_obs, n_vars = matrix.shape
    if dense:
        return n_obs * n_vars * 4
    return int(matrix.nnz) * (4 + 8) + (n_obs + 1) * 8


class DeviceStore:
    """The registered tensors of every cell, held on one device, and minibatch gathers over them.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    device
        Where the tensors live.
    dense
        Hold the expression densely (fast gathers) rather than as CSR (less memory).
    """

    def __init__(self, adata_manager: AnnDataManager, device: torch.device, dense: bool):
        self.device = device
        self.dense = dense
        matrix = adata_manager.get_from_registry(SCVI_KEYS.X_KEY)
        self.n_vars = int(matrix.shape[1])
        if dense:
            values = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
            self.X = torch.as_tensor(np.asarray(values, dtype=np.float32), device=device)
        else:
            csr = sp.csr_matrix(matrix)
            self.crow = torch.as_tensor(csr.indptr.astype(np.int64), device=device)
            self.col = torch.as_tensor(csr.indices.astype(np.int64), device=device)
            self.values = torch.as_tensor(csr.data.astype(np.float32), device=device)
        self.tensors = registered_tensors(adata_manager, device)
        groups, _ = registered_pairing_groups(adata_manager)
        bank = ControlBank(groups, control_mask(adata_manager))
        position = bank.positions(groups)
        self.group_position = torch.as_tensor(position, device=device)
        self.bank_cells = torch.as_tensor(bank.cells, device=device)
        self.bank_offsets = torch.as_tensor(bank.offsets, device=device)
        self.bank_counts = torch.as_tensor(bank.counts, device=device)

    def expression(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense ``(len(rows), n_vars)`` float32 expression of ``rows``."""
        if self.dense:
            return self.X[rows]
        starts = self.crow[rows]
        lengths = self.crow[rows + 1] - starts
        out = torch.zeros(len(rows), self.n_vars, dtype=torch.float32, device=self.device)
        row_of_entry = torch.repeat_interleave(torch.arange(len(rows), device=self.device), lengths)
        first_entry = torch.cumsum(lengths, 0) - lengths
        entry = starts[row_of_entry] + torch.arange(len(row_of_entry), device=self.device) - first_entry[row_of_entry]
        out[row_of_entry, self.col[entry]] = self.values[entry]
        return out

    def anchors(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One control cell per row, uniform over the control cells of the row's pairing group."""
        position = self.group_position[rows]
        counts = self.bank_counts[position]
        uniform = torch.rand(len(rows), generator=generator, device=self.device, dtype=torch.float64)
        draw = torch.minimum((uniform * counts).long(), counts - 1)
        return self.bank_cells[self.bank_offsets[position] + draw]

    def batch(self, rows: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The minibatch of ``rows``: every registered tensor plus ``anchor_X``."""
        batch = {SCVI_KEYS.X_KEY: self.expression(rows)}
        batch.update({key: value[rows] for key, value in self.tensors.items()})
        batch[REGISTRY_KEYS.ANCHOR_X_KEY] = self.expression(self.anchors(rows, generator))
        return batch


class DeviceBatches:
    """An iterable of device-resident minibatches over some cells (one pass per ``iter``).

    Parameters
    ----------
    store
        The device-resident tensors.
    indices
        Cells to iterate over.
    batch_size
        Minibatch size (per rank under distributed training).
    shuffle
        Draw a new permutation on each pass.
    drop_last
        Drop the last incomplete minibatch.
    seed
        Seeds the permutation (shared by all ranks) and, plus the rank, the anchors.
    rank, world_size
        This process's shard of each permutation under distributed training.
    """

    def __init__(self, store: DeviceStore, indices: np.ndarray, batch_size: int, shuffle: bool,
                 drop_last: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.store = store
        self.indices = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=store.device)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.anchor_generator = torch.Generator(device=store.device)
        self.anchor_generator.manual_seed(self.seed + self.rank)

    @property
    def n_rows(self) -> int:
        """Rows this rank visits per pass (shards are padded to equal size, as DDP needs)."""
        return -(-len(self.indices) // self.world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n_rows // self.batch_size
        return -(-self.n_rows // self.batch_size)

    def rows(self, epoch: int) -> torch.Tensor:
        """The cells this rank visits on pass ``epoch``, in order."""
        rows = self.indices
        if self.shuffle:
            # Every rank draws the same permutation (same seed and epoch) and keeps its shard.
            generator = torch.Generator(device=self.store.device)
            generator.manual_seed(self.seed * 100_003 + epoch)
            rows = rows[torch.randperm(len(rows), generator=generator, device=self.store.device)]
        if self.world_size > 1:
            padded = self.n_rows * self.world_size
            rows = torch.cat([rows, rows[: padded - len(rows)]])[self.rank :: self.world_size]
        return rows

    def __iter__(self):
        rows = self.rows(self.epoch)
        self.epoch += 1
        for batch_index in range(len(self)):
            chunk = rows[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            yield self.store.batch(chunk, self.anchor_generator)


class DeviceDataSplitter(DataSplitter):
    """A :class:`~scvi.dataloaders.DataSplitter` whose minibatches and anchors live on the device.

    Use it when the data fit on the accelerator (or, on CPU, in RAM): each training step then
    costs a few device gathers instead of host-side slicing, densifying and copying. Splitting
    into training, validation and test cells is scvi-tools' own.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    train_size, validation_size, shuffle_set_split, external_indexing
        As for :class:`~scvi.dataloaders.DataSplitter`.
    load_sparse_tensor, pin_memory
        Accepted for compatibility and ignored: batches are always dense and already on the
        device.
    distributed_sampler
        Accepted for compatibility; under distributed training the rank and world size are read
        from the Lightning trainer (or ``torch.distributed``) instead.
    batch_size
        Minibatch size (per rank under distributed training).
    device
        ``"auto"``: the trainer's device when attached to one, else the first CUDA device, else
        the CPU.
    layout
        ``"dense"`` or ``"csr"`` expression on the device; ``"auto"`` takes dense when it fits.
    memory_fraction
        Share of the device's free memory the data may take, leaving room for the model.
    seed
        Seed of the permutations and anchors; ``scvi.settings.seed`` when ``None``.
    **kwargs
        ``drop_last``; ``num_workers``, ``persistent_workers`` and ``drop_dataset_tail`` are
        accepted and ignored.

    Raises
    ------
    ValueError
        When the registered expression is out of core (a backed AnnData or a TileDB-SOMA store):
        it is not copied to the device; use ``loader="streamed"``
        (:class:`~perturbscope.data.StreamedDataSplitter`) or load it into memory.
    MemoryError
        When the data do not fit in ``memory_fraction`` of the device's free memory, with both
        sizes.

    Examples
    --------
    >>> import perturbscope as ps
    >>> adata, emb = ps.data.simulate_perturbseq(n_genes=30, n_perturbed_genes=6,
    ...                                          n_combinations=2, n_cells_per_condition=10)
    >>> ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=emb, context_key="cell_type")
    >>> model = ps.ScopeVI(adata, n_latent=4, n_hidden=16, effect_prior=False)
    >>> splitter = DeviceDataSplitter(model.adata_manager, batch_size=32, device="cpu")
    >>> splitter.setup()
    >>> batch = next(iter(splitter.train_dataloader()))
    >>> sorted(batch), tuple(batch["anchor_X"].shape)
    (['X', 'anchor_X', 'batch', 'context', 'perturbation_genes'], (32, 30))
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        pin_memory: bool = False,
        external_indexing: list[np.ndarray] | None = None,
        distributed_sampler: bool = False,
        batch_size: int = 128,
        device: str | torch.device = "auto",
        layout: str = "auto",
        memory_fraction: float = 0.8,
        seed: int | None = None,
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - {"drop_last", *_IGNORED_LOADER_OPTIONS})
        if unknown:
            raise TypeError(f"DeviceDataSplitter got unexpected keyword arguments {unknown}.")
        if layout not in ("auto", "dense", "csr"):
            raise ValueError(f"layout must be 'auto', 'dense' or 'csr', got {layout!r}.")
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        matrix = adata_manager.get_from_registry(SCVI_KEYS.X_KEY)
        if is_out_of_core(matrix):
            raise ValueError(
                "DeviceDataSplitter copies all the expression to the device, but the registered expression is "
                f"read from {out_of_core_source(adata_manager.adata, matrix)}; train with loader='streamed', or "
                "load it into memory with adata.to_memory() and set it up again."
            )
        drop_last = kwargs.get("drop_last", False)
        super().__init__(
            adata_manager, train_size=train_size, validation_size=validation_size,
            shuffle_set_split=shuffle_set_split, load_sparse_tensor=False, pin_memory=False,
            external_indexing=external_indexing, batch_size=batch_size, drop_last=drop_last,
        )
        self.batch_size = int(batch_size)
        self.requested_device = device
        self.layout = layout
        self.memory_fraction = float(memory_fraction)
        self.seed = int(settings.seed or 0) if seed is None else int(seed)
        self.store: DeviceStore | None = None
        # Fail on entry, before any copy, when the data cannot fit where they are going.
        self.device = resolve_device(device)
        self.dense = self._choose_layout(self.device)

    def _choose_layout(self, device: torch.device) -> bool:
        """Dense or CSR, after checking that the data fit on ``device``; ``True`` for dense."""
        matrix = self.adata_manager.get_from_registry(SCVI_KEYS.X_KEY)
        n_obs = self.adata_manager.adata.n_obs
        # Every other registered column (at most 8 bytes a value), the group positions and the bank.
        widths = [_registered_width(self.adata_manager.get_from_registry(key), n_obs)
                  for key in self.adata_manager.data_registry if key != SCVI_KEYS.X_KEY]
        other = n_obs * 8 * (sum(widths) + 2)
        free = available_memory(device)
        budget = self.memory_fraction * free
        dense_bytes = _expression_bytes(matrix, dense=True) + other
        sparse_bytes = _expression_bytes(matrix, dense=False) + other if sp.issparse(matrix) else dense_bytes
        if self.layout == "dense" or (self.layout == "auto" and dense_bytes <= budget):
            needed, dense = dense_bytes, True
        else:
            needed, dense = sparse_bytes, not sp.issparse(matrix)
        if needed > budget:
            raise MemoryError(
                f"DeviceDataSplitter: the registered data need {format_bytes(needed)} on {device} "
                f"({'dense' if dense else 'CSR'} expression of {n_obs} cells x {matrix.shape[1]} genes), "
                f"but memory_fraction={self.memory_fraction} of the {format_bytes(free)} free there "
                f"allows {format_bytes(budget)}. Train with the default anchored loader instead."
            )
        return dense

    def _trainer_placement(self) -> tuple[torch.device, int, int]:
        """Device, rank and world size from the attached Lightning trainer, if any."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            return self.device, distributed_rank(), world
        device = trainer.strategy.root_device
        if not (isinstance(self.requested_device, str) and self.requested_device == "auto"):
            device = self.device
        return device, int(trainer.global_rank), int(trainer.world_size)

    def setup(self, stage: str | None = None):
        """Split the cells (as scvi-tools does), then copy the data to the device once."""
        super().setup(stage)
        device, self.rank, self.world_size = self._trainer_placement()
        if device != self.device:
            self.device, self.dense = device, self._choose_layout(device)
        if self.store is None or self.store.device != self.device:
            self.store = DeviceStore(self.adata_manager, self.device, self.dense)

    def _batches(self, indices: np.ndarray, shuffle: bool, drop_last: bool, offset: int) -> DeviceBatches:
        if self.store is None:
            self.setup()
        return DeviceBatches(self.store, indices, self.batch_size, shuffle=shuffle, drop_last=drop_last,
                             seed=self.seed + offset, rank=self.rank, world_size=self.world_size)

    def train_dataloader(self) -> DeviceBatches:
        """Shuffled training minibatches, with fresh anchors on each pass."""
        return self._batches(self.train_idx, shuffle=True, drop_last=self.drop_last, offset=0)

    def val_dataloader(self) -> DeviceBatches | None:
        """Validation minibatches in order, or ``None`` without validation cells."""
        if len(self.val_idx) == 0:
            return None
        return self._batches(self.val_idx, shuffle=False, drop_last=False, offset=1_000_003)

    def test_dataloader(self) -> DeviceBatches | None:
        """Test minibatches in order, or ``None`` without test cells."""
        if len(self.test_idx) == 0:
            return None
        return self._batches(self.test_idx, shuffle=False, drop_last=False, offset=2_000_003)

