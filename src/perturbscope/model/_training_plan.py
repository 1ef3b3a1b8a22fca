"""ScopeVI's training plan: scvi-tools' :class:`~scvi.train.TrainingPlan` with an optional compiled step.

On a GPU one eager ScopeVAE step is bound by kernel launches, not arithmetic: its time hardly
changes between batch 128 and 16,384. :func:`torch.compile` fuses those kernels (and, with
``mode="reduce-overhead"``, replays them as CUDA graphs). :class:`ScopeTrainingPlan` compiles
the module's forward pass (inference, generative and loss) when asked (``compile=True``, or
``"auto"``: only on a CUDA device), and falls back to the eager module with a
warning when compilation is unavailable or fails, so that training never depends on it.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from scvi import settings
from scvi.module.base import BaseModuleClass
from scvi.train import TrainingPlan


class ScopeTrainingPlan(TrainingPlan):
    """A :class:`~scvi.train.TrainingPlan` whose forward pass may run through :func:`torch.compile`.

    Parameters
    ----------
    module
        The module to train.
    compile
        ``False`` (default): the eager module. ``"auto"``: compile when training on a CUDA
        device, stay eager on CPU. ``True``: compile on any device.
    compile_mode
        ``mode`` of :func:`torch.compile`; ``"auto"`` is ``"reduce-overhead"`` on CUDA (CUDA
        graphs remove the launch cost) and ``"default"`` elsewhere.
    compile_backend
        ``backend`` of :func:`torch.compile` (``"inductor"`` generates fused kernels).
    **kwargs
        Passed to :class:`~scvi.train.TrainingPlan`.

    Notes
    -----
    The compiled function is the module's own ``forward``, so the parameters, the optimiser and
    the saved weights are those of the eager module. A failure of compilation (no compiler, an
    unsupported platform) at the first step is reported as a warning and the step is re-run
    eagerly.

    Examples
    --------
    >>> import perturbscope as ps
    >>> adata, emb = ps.data.simulate_perturbseq(n_genes=30, n_perturbed_genes=6,
    ...                                          n_combinations=2, n_cells_per_condition=10)
    >>> ps.ScopeVI.setup_anndata(adata, "perturbation", gene_embeddings=emb)
    >>> model = ps.ScopeVI(adata, n_latent=4, n_hidden=16, effect_prior=False)
    >>> model._training_plan_cls = ScopeTrainingPlan
    >>> model.train(max_epochs=1, enable_progress_bar=False, plan_kwargs={"compile": False})
    >>> model.trainer.lightning_module.is_compiled
    False
    """

    def __init__(
        self,
        module: BaseModuleClass,
        *,
        compile: bool | Literal["auto"] = False,
        compile_mode: str = "auto",
        compile_backend: str = "inductor",
        **kwargs,
    ):
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}.")
        super().__init__(module, **kwargs)
        self.compile_forward = compile
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend
        self._compiled_forward = None
        self._compiled_checked = False
        self._cuda_graphs = False

    @property
    def is_compiled(self) -> bool:
        """Whether the forward pass runs through :func:`torch.compile` (``False`` after a fallback)."""
        return self._compiled_forward is not None

    def _should_compile(self, device: torch.device) -> bool:
        if self.compile_forward == "auto":
            return device.type == "cuda"
        return bool(self.compile_forward)

    def _compile(self, device: torch.device) -> None:
        """Wrap the module's forward in :func:`torch.compile`, or warn why it stays eager."""
        self._compiled_forward, self._compiled_checked, self._cuda_graphs = None, False, False
        if not self._should_compile(device):
            return
        mode = self.compile_mode
        if mode == "auto":
            mode = "reduce-overhead" if device.type == "cuda" else "default"
        # CUDA graphs replay into static buffers: each step is marked so that the previous step's
        # outputs are released rather than read after being overwritten.
        self._cuda_graphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
        try:
            self._compiled_forward = torch.compile(self.module.forward, mode=mode, backend=self.compile_backend)
        except Exception as error:  # any failure means: train eagerly
            self._warn_eager(error)

    @staticmethod
    def _warn_eager(error: Exception) -> None:
        warnings.warn(
            f"torch.compile is unavailable or failed ({type(error).__name__}: {error}); training continues "
            "with the eager module.", UserWarning, stacklevel=settings.warnings_stacklevel,
        )

    def on_fit_start(self) -> None:
        """Compile (or not) for the device training runs on."""
        self._compile(self.device)

    def forward(self, *args, **kwargs):
        """The module's forward pass, compiled when compilation is on and works."""
        kwargs.setdefault("get_inference_input_kwargs", {"full_forward_pass": not self.update_only_decoder})
        if self._compiled_forward is None:
            return self.module(*args, **kwargs)
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self._compiled_checked:
            return self._compiled_forward(*args, **kwargs)
        try:
            result = self._compiled_forward(*args, **kwargs)
        except Exception as error:  # compilation happens at the first call
            self._warn_eager(error)
            self._compiled_forward = None
            return self.module(*args, **kwargs)
        self._compiled_checked = True
        return result
