"""Protein-language-model gene embeddings with fair-esm's ESM2.

Design
------
* **Loading.** No code in a checkpoint ever runs. fair-esm's own loaders call ``torch.load``
  without ``weights_only`` (so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` makes them unpickle
  anything), and fair-esm's hub download uses ``weights_only=False``. We read the checkpoint and
  its ``-contact-regression.pt`` ourselves with :func:`perturbscope._safe_load.load_model_file`
  (an allow-list unpickler of containers, tensors and ``argparse.Namespace``, for the
  ``cfg``/``args`` of ESM checkpoints), then hand the dicts to ``esm.pretrained.load_model_and_alphabet_core``. A model
  *name* is downloaded with ``torch.hub.download_url_to_file`` into fair-esm's cache folder and
  read the same way; downloading needs internet, and the error says so.
* **Pooling.** ``"mean"`` averages the residue representations of the chosen layer, leaving out
  the BOS and EOS tokens and padding; ``"bos"`` takes the BOS (``<cls>``) token.
* **Long sequences.** ESM2 was trained on at most 1,022 residues. A longer protein is cut into
  windows of ``window`` residues whose starts are ``stride`` apart, the last window ending at the
  final residue; each window is pooled on its own and the window embeddings are averaged with equal
  weight.
* **Batching.** Windows are sorted by length and packed so that ``batch size x padded length``
  stays within ``max_tokens``.
* **Cache.** With ``cache_dir`` each protein's embedding is a ``.npy`` file named by the SHA-256
  of its sequence, in a folder keyed by model, layer, pooling and windowing; a re-run only
  computes proteins it has not seen, and does not load the model when everything is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scvi.utils import track

from .._logging import progress_switch
from .._safe_load import load_model_file
from ._files import _preview, check_gene_embeddings

_ESM2_NAME = re.compile(r"^esm2_t(\d+)_")
_VALID_RESIDUES = set("LAGVSERTIDPKQNFYMHWCXBUZO")


def _import_esm():
    try:
        import esm
    except ImportError as error:
        raise ImportError("ESM2 embeddings need fair-esm: `pip install fair-esm`.") from error
    return esm


def read_protein_fasta(path: str | os.PathLike, duplicates: str = "raise") -> dict[str, str]:
    r"""Read ``{gene: protein sequence}`` from a FASTA file whose headers name genes.

    The gene is the ``GN=`` field of a UniProt header (``>sp|P04637|P53_HUMAN ... GN=TP53 ...``),
    otherwise the first word of the header (``>TP53 some description``).

    Parameters
    ----------
    path
        The FASTA file.
    duplicates
        What to do when a gene has several entries (isoforms, unreviewed entries):
        ``"raise"``, keep the ``"first"``, or keep the ``"longest"``.

    Returns
    -------
    ``{gene: sequence}`` in file order, sequences upper-cased with a trailing ``*`` removed.

    Raises
    ------
    ValueError
        If the file has no entries, a sequence comes before any header, or a gene repeats
        with ``duplicates="raise"`` (the genes are named).

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "p.fasta")
    >>> _ = open(path, "w").write(">sp|P1|X_HUMAN Some protein OS=Homo sapiens GN=KLF1 PE=1\nMKV\nLA\n")
    >>> read_protein_fasta(path)
    {'KLF1': 'MKVLA'}
    """
    if duplicates not in ("raise", "first", "longest"):
        raise ValueError(f"duplicates must be 'raise', 'first' or 'longest', got {duplicates!r}.")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"FASTA file {str(path)!r} does not exist.")
    entries: list[tuple[str, list[str]]] = []
    with open(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                header = line[1:].strip()
                match = re.search(r"\bGN=(\S+)", header)
                gene = match.group(1) if match else (header.split()[0] if header else "")
                if not gene:
                    raise ValueError(f"{str(path)!r} line {line_number}: empty FASTA header.")
                entries.append((gene, []))
            else:
                if not entries:
                    raise ValueError(
                        f"{str(path)!r} line {line_number}: sequence before any '>' header."
                    )
                entries[-1][1].append(line)
    if not entries:
        raise ValueError(f"{str(path)!r} holds no FASTA entries (lines starting with '>').")
    sequences: dict[str, str] = {}
    repeated: list[str] = []
    for gene, lines in entries:
        sequence = "".join(lines).upper().rstrip("*")
        if gene in sequences:
            repeated.append(gene)
            if duplicates == "longest" and len(sequence) > len(sequences[gene]):
                sequences[gene] = sequence
            continue
        sequences[gene] = sequence
    if repeated and duplicates == "raise":
        raise ValueError(
            f"{str(path)!r} has several entries for genes {_preview(dict.fromkeys(repeated))}; "
            "use read_protein_fasta(path, duplicates='longest' or 'first') and pass the dict."
        )
    return sequences


def _check_sequences(sequences: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(sequences, Mapping):
        raise TypeError(
            f"sequences must be a {{gene: protein sequence}} dict or a FASTA path, got {type(sequences).__name__}."
        )
    if not sequences:
        raise ValueError("sequences is empty; expected at least one {gene: protein sequence}.")
    out = {str(g): str(s).strip().upper().rstrip("*") for g, s in sequences.items()}
    empty = [g for g, s in out.items() if not s]
    if empty:
        raise ValueError(f"Genes {_preview(empty)} have empty protein sequences.")
    invalid = {
        g: sorted(set(s) - _VALID_RESIDUES) for g, s in out.items() if set(s) - _VALID_RESIDUES
    }
    if invalid:
        shown = dict(list(invalid.items())[:10])
        raise ValueError(
            f"Protein sequences of {len(invalid)} genes hold characters that are not amino-acid "
            f"letters: {shown}; expected one-letter codes from {''.join(sorted(_VALID_RESIDUES))}."
        )
    return out


def _load_model(model: Any):
    """``(module, alphabet, key, model_label)`` from a name, a checkpoint path or a loaded pair."""
    esm = _import_esm()

    if isinstance(model, tuple):
        if len(model) != 2:
            raise TypeError("A loaded model must be passed as the pair (model, alphabet).")
        module, alphabet = model
        digest = hashlib.sha256()
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
        return (
            module,
            alphabet,
            f"loaded-{type(module).__name__}-{digest.hexdigest()[:16]}",
            type(module).__name__,
        )
    if not isinstance(model, str | os.PathLike):
        raise TypeError(
            f"model must be a fair-esm model name, a checkpoint path or a (model, alphabet) pair, "
            f"got {type(model).__name__}."
        )
    path = Path(model)
    looks_like_path = path.exists() or path.suffix == ".pt" or os.sep in str(model)
    if looks_like_path:
        if not path.exists():
            raise FileNotFoundError(f"ESM checkpoint {str(path)!r} does not exist.")
        regression = Path(str(path.with_suffix("")) + "-contact-regression.pt")
        if not regression.exists() and _needs_regression(path.stem):
            raise FileNotFoundError(
                f"fair-esm expects the contact-regression weights {str(regression)!r} beside the "
                "checkpoint, as real downloads have (fetch `<name>-contact-regression.pt` too)."
            )
        module, alphabet = _load_checkpoint(esm, path, regression)
        return module, alphabet, _model_key_without_loading(path), str(path)
    name = str(model)
    if not hasattr(esm.pretrained, name):
        raise ValueError(
            f"{name!r} is neither an existing checkpoint file nor a fair-esm model name such as "
            "'esm2_t33_650M_UR50D', 'esm2_t30_150M_UR50D', 'esm2_t12_35M_UR50D' or 'esm2_t6_8M_UR50D'."
        )
    try:
        path, regression = _download_checkpoint(name)
    except Exception as error:
        raise RuntimeError(
            f"Could not load the ESM model {name!r}: fair-esm downloads its weights from "
            "dl.fbaipublicfiles.com, which needs internet. Without internet, download "
            f"'{name}.pt' and '{name}-contact-regression.pt' elsewhere and pass the local "
            f".pt path as model. Original error: {error}"
        ) from error
    module, alphabet = _load_checkpoint(esm, path, regression)
    return module, alphabet, name, name


def _needs_regression(stem: str) -> bool:
    """fair-esm's rule: every model but ESM-1v and ESM-IF has contact-regression weights."""
    return "esm1v" not in stem and "esm_if" not in stem


def _download_checkpoint(name: str) -> tuple[Path, Path]:
    """Download ``name`` (and its contact regression) into fair-esm's torch-hub cache folder."""
    import torch

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    base = "https://dl.fbaipublicfiles.com/fair-esm"
    files = [(f"{base}/models/{name}.pt", folder / f"{name}.pt")]
    regression = folder / f"{name}-contact-regression.pt"
    if _needs_regression(name):
        files.append((f"{base}/regression/{name}-contact-regression.pt", regression))
    for url, target in files:
        if not target.exists():
            torch.hub.download_url_to_file(url, str(target), progress=False)
    return files[0][1], regression


def _load_checkpoint(esm: Any, path: Path, regression: Path) -> tuple[Any, Any]:
    """Build fair-esm's model from a checkpoint read without running code from it.

    Raises
    ------
    ValueError
        If the checkpoint or its regression file names a global outside the ESM allow-list
        (a code payload) or is not a torch file; the message names the file and the global.
    RuntimeError
        If fair-esm cannot build a model from the (safely read) checkpoint.
    """
    model_data = load_model_file(path, allow="esm")
    regression_data = (
        load_model_file(regression, allow="esm")
        if _needs_regression(path.stem) and regression.exists()
        else None
    )
    for file, data in ((path, model_data), (regression, regression_data)):
        if data is not None and not (
            isinstance(data, dict) and isinstance(data.get("model"), dict)
        ):
            raise ValueError(
                f"{str(file)!r} is not an ESM checkpoint: expected a dict with a 'model' state "
                f"dict, found {sorted(data) if isinstance(data, dict) else type(data).__name__}"
            )
    try:
        return esm.pretrained.load_model_and_alphabet_core(path.stem, model_data, regression_data)
    except Exception as error:
        raise RuntimeError(
            f"Could not load the ESM checkpoint {str(path)!r}: {type(error).__name__}: {error}"
        ) from error


def _windows(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Overlapping ``(start, end)`` windows covering ``range(length)``; the last ends at ``length``."""
    if length <= window:
        return [(0, length)]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return [(s, s + window) for s in starts]


def _batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Pack items (sorted by length) so that ``len(batch) * (longest + 2) <= max_tokens``."""
    order = np.argsort(lengths, kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        size = lengths[i] + 2
        if current and (len(current) + 1) * max(longest, size) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(int(i))
        longest = max(longest, size)
    if current:
        batches.append(current)
    return batches


def esm2_embeddings(
    sequences: Mapping[str, str] | str | os.PathLike,
    model: str | os.PathLike | tuple = "esm2_t33_650M_UR50D",
    repr_layer: int | None = None,
    pooling: str = "mean",
    max_tokens: int = 4096,
    device: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    window: int = 1022,
    stride: int | None = None,
    progress_bar: bool = True,
    show_progress: bool | None = None,
) -> pd.DataFrame:
    """Per-gene protein embeddings from an ESM2 protein language model (fair-esm).

    Parameters
    ----------
    sequences
        ``{gene: protein sequence}``, or the path of a FASTA file whose headers hold gene symbols
        (see :func:`read_protein_fasta`; use it directly to choose among duplicate entries).
    model
        A fair-esm model name (downloaded by fair-esm: needs internet), the path of a local
        checkpoint ``.pt`` with its ``<stem>-contact-regression.pt`` beside it, or an already
        loaded ``(model, alphabet)`` pair.
    repr_layer
        The layer whose representations are pooled; ``None`` takes the last one. ``0`` is the
        token embedding.
    pooling
        ``"mean"`` over residues (BOS, EOS and padding excluded) or ``"bos"`` (the ``<cls>``
        token).
    max_tokens
        Token budget per batch (sequences x padded length, BOS/EOS included). Must hold one full
        window (``window + 2``).
    device
        Torch device; ``None`` picks CUDA when available, else CPU.
    cache_dir
        Folder for the on-disk cache keyed by model, layer, pooling, windowing and the SHA-256 of
        each sequence. ``None`` disables caching.
    window
        Longest piece of a protein fed to the model (ESM2 was trained on 1,022 residues). Longer
        proteins are cut into overlapping windows whose pooled embeddings are averaged.
    stride
        Distance between window starts; ``None`` means ``window // 2``. The last window always
        ends at the protein's last residue.
    progress_bar
        Show a progress bar over batches.
    show_progress
        Deprecated name of ``progress_bar``, kept for one release (warns with a
        :class:`FutureWarning`).

    Returns
    -------
    A DataFrame, genes (in input order) x embedding dimensions (``esm2_0``, ...). ``.attrs``
    holds the provenance: ``source`` (``"esm2"``), ``model``, ``layer``, ``pooling``, ``window``
    and ``stride``.

    Raises
    ------
    ValueError
        For an unknown model name, an out-of-range layer, an unknown pooling, a token budget that
        cannot hold a window, or sequences with non-amino-acid characters (genes named); and for
        a checkpoint that is not a torch file or asks to run code (a global outside the ESM
        allow-list: containers, tensors, ``argparse.Namespace``); nothing in it runs.
    RuntimeError
        If the weights cannot be loaded; for a model name the message says that it needs internet.

    Examples
    --------
    >>> import esm
    >>> net = esm.model.esm2.ESM2(num_layers=1, embed_dim=16, attention_heads=2)
    >>> emb = esm2_embeddings({"KLF1": "MKVLA", "SET": "MSAPAAK"}, model=(net, net.alphabet),
    ...                       progress_bar=False)
    >>> emb.shape, emb.attrs["pooling"]
    ((2, 16), 'mean')
    """
    progress_bar = progress_switch(progress_bar, show_progress, "esm2_embeddings", "show_progress")
    if pooling not in ("mean", "bos"):
        raise ValueError(f"pooling must be 'mean' or 'bos', got {pooling!r}.")
    if isinstance(sequences, str | os.PathLike):
        sequences = read_protein_fasta(sequences)
    sequences = _check_sequences(sequences)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive number of residues, got {window!r}.")
    stride = window // 2 if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and window={window}, got {stride!r}.")
    if max_tokens < window + 2:
        raise ValueError(
            f"max_tokens={max_tokens} cannot hold one window of {window} residues plus BOS/EOS; "
            f"use max_tokens >= {window + 2}."
        )
    if repr_layer is not None and (not isinstance(repr_layer, int) or repr_layer < 0):
        raise ValueError(
            f"repr_layer must be a non-negative layer index or None, got {repr_layer!r}."
        )

    loaded = None
    cache: Path | None = None
    if cache_dir is not None:
        if isinstance(model, tuple):
            loaded = _load_model(model)
            model_key = loaded[2]
        else:
            model_key = _model_key_without_loading(model)
        cache = (
            Path(cache_dir)
            / model_key
            / f"layer-{'last' if repr_layer is None else repr_layer}_{pooling}_w{window}_s{stride}"
        )
    hashes = {g: hashlib.sha256(s.encode()).hexdigest() for g, s in sequences.items()}
    results: dict[str, np.ndarray] = {}
    if cache is not None and cache.is_dir():
        for gene, digest in hashes.items():
            file = cache / f"{digest}.npy"
            if file.exists():
                results[gene] = np.load(file)
    todo = {g: s for g, s in sequences.items() if g not in results}

    meta_path = cache / "meta.json" if cache is not None else None
    if todo or meta_path is None or not meta_path.exists():
        loaded = loaded if loaded is not None else _load_model(model)
        module, alphabet, _, model_label = loaded
        num_layers = int(getattr(module, "num_layers", 0))
        layer = num_layers if repr_layer is None else repr_layer
        if layer > num_layers:
            raise ValueError(
                f"repr_layer={layer} is out of range: the model has layers 0..{num_layers}."
            )
        computed = _embed(
            module,
            alphabet,
            todo,
            layer,
            pooling,
            max_tokens,
            device,
            window,
            stride,
            progress_bar,
        )
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            for gene, vector in computed.items():
                np.save(cache / f"{hashes[gene]}.npy", vector)
            meta_path.write_text(json.dumps({"model": model_label, "layer": layer}))
        results.update(computed)
    else:
        meta = json.loads(meta_path.read_text())
        model_label, layer = meta["model"], meta["layer"]

    genes = list(sequences)
    matrix = np.stack([results[g] for g in genes]).astype(np.float64)
    df = pd.DataFrame(
        matrix,
        index=pd.Index(genes, name="gene"),
        columns=[f"esm2_{i}" for i in range(matrix.shape[1])],
    )
    df = check_gene_embeddings(df, name="ESM2 embeddings")
    df.attrs = {
        "source": "esm2",
        "model": model_label,
        "layer": int(layer),
        "pooling": pooling,
        "window": window,
        "stride": stride,
    }
    return df


def _model_key_without_loading(model: str | os.PathLike) -> str:
    path = Path(model)
    if path.exists():
        stat = path.stat()
        digest = hashlib.sha256(
            f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
        ).hexdigest()[:16]
        return f"{path.stem}-{digest}"
    return str(model)


def _embed(
    module, alphabet, sequences, layer, pooling, max_tokens, device, window, stride, progress_bar
):
    """Pool each window of each sequence, then average windows per gene.

    A model the caller passed in is left as it was found (its device and training mode).
    """
    if not sequences:
        return {}
    training = module.training
    first = next(module.parameters(), None)
    home = None if first is None else first.device  # the device itself: .to() moves parameters in place
    try:
        return _embed_on_device(module, alphabet, sequences, layer, pooling, max_tokens, device, window, stride,
                                progress_bar)
    finally:
        module.train(training)
        if home is not None:
            module.to(home)


def _embed_on_device(
    module, alphabet, sequences, layer, pooling, max_tokens, device, window, stride, progress_bar
):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module = module.eval().to(device)
    pieces: list[tuple[str, str]] = []
    for gene, sequence in sequences.items():
        pieces.extend(
            (gene, sequence[start:end]) for start, end in _windows(len(sequence), window, stride)
        )
    converter = alphabet.get_batch_converter()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    batches = _batches([len(p[1]) for p in pieces], max_tokens)
    with torch.inference_mode():
        for batch in track(batches, description="ESM2 batches", disable=not progress_bar):
            _, _, tokens = converter([pieces[i] for i in batch])
            tokens = tokens.to(device)
            hidden = module(tokens, repr_layers=[layer])["representations"][layer]
            if pooling == "bos":
                pooled = hidden[:, 0]
            else:
                residue = (
                    (tokens != alphabet.padding_idx)
                    & (tokens != alphabet.cls_idx)
                    & (tokens != alphabet.eos_idx)
                )
                weights = residue.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1)
            pooled = pooled.float().cpu().numpy().astype(np.float64)
            for row, i in enumerate(batch):
                gene = pieces[i][0]
                sums[gene] = sums.get(gene, 0.0) + pooled[row]
                counts[gene] = counts.get(gene, 0) + 1
    return {gene: sums[gene] / counts[gene] for gene in sequences}
