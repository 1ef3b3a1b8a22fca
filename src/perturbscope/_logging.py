"""The package logger, whose level follows ``scvi.settings.verbosity``, and a Lightning hush.

``logging.getLogger("perturbscope")`` (:data:`logger`) reports what perturbscope does, the way
scvi-tools reports through ``logging.getLogger("scvi")``. Setting
``scvi.settings.verbosity = logging.WARNING`` (which sets the ``"scvi"`` logger's level) quiets
both; a level set on the ``"perturbscope"`` logger itself takes precedence. The logger is made
with a small :class:`logging.Logger` subclass whose effective level, while its own level is
unset, is the ``"scvi"`` logger's; :mod:`logging` clears its level caches whenever any level
changes, so the two stay in step without either package knowing the other. Nothing here imports
scvi-tools, so the command line's ``--help`` stays fast.

:func:`quiet_loggers` raises any loggers for the length of a ``with`` block (the tools use it
to hide scvi-tools' "AnnData object appears to be a copy" for the scratch AnnData they register
themselves); :func:`quiet_lightning` silences Lightning's start-up lines ("GPU available: ...", the
``litlogger``/``litmodels`` tips) inside a ``with`` block only: the loggers' levels are restored
on exit, so a user's own Lightning runs still print them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: Name of the package logger.
LOGGER_NAME = "perturbscope"
#: The scvi-tools logger whose level ours follows.
SCVI_LOGGER_NAME = "scvi"
#: Lightning loggers that print the accelerator summary and the cloud tips at ``INFO``.
LIGHTNING_LOGGERS = (
    "lightning.pytorch",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric",
    "lightning.fabric.utilities.rank_zero",
    "pytorch_lightning",
)


class _FollowsScvi(logging.Logger):
    """A logger whose level, while unset, is the ``"scvi"`` logger's effective level."""

    def getEffectiveLevel(self) -> int:
        if self.level != logging.NOTSET:
            return self.level
        return logging.getLogger(SCVI_LOGGER_NAME).getEffectiveLevel()


def _package_logger() -> logging.Logger:
    existing = logging.Logger.manager.loggerDict.get(LOGGER_NAME)
    if isinstance(existing, logging.Logger):  # made before us (by a user's getLogger call)
        return existing
    previous = logging.getLoggerClass()
    logging.setLoggerClass(_FollowsScvi)
    try:
        made = logging.getLogger(LOGGER_NAME)
    finally:
        logging.setLoggerClass(previous)
    if not made.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        made.addHandler(handler)
    return made


#: ``logging.getLogger("perturbscope")``.
logger = _package_logger()


#: scvi-tools' logger of model setup transfers ("AnnData object appears to be a copy...").
SCVI_SETUP_LOGGER = "scvi.model.base._base_model"


@contextmanager
def quiet_loggers(names: tuple[str, ...], level: int = logging.WARNING) -> Iterator[None]:
    """Raise the named loggers to ``level`` inside the block and restore their levels after.

    Parameters
    ----------
    names
        Logger names.
    level
        The level they are set to inside the block.

    Yields
    ------
    Nothing; the levels are restored when the block ends, also on an exception.

    Examples
    --------
    >>> import logging
    >>> with quiet_loggers(("scvi.model.base._base_model",)):
    ...     logging.getLogger("scvi.model.base._base_model").level == logging.WARNING
    True
    """
    loggers = [logging.getLogger(name) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved, strict=True):
            lg.setLevel(old)


@contextmanager
def quiet_lightning(level: int = logging.WARNING) -> Iterator[None]:
    """Raise Lightning's loggers to ``level`` inside the block and restore them after.

    Parameters
    ----------
    level
        The level the Lightning loggers are set to inside the block.

    Yields
    ------
    Nothing; the levels are restored when the block ends, also on an exception.

    Examples
    --------
    >>> import logging
    >>> before = logging.getLogger("lightning.pytorch").level
    >>> with quiet_lightning():
    ...     logging.getLogger("lightning.pytorch").level == logging.WARNING
    True
    >>> logging.getLogger("lightning.pytorch").level == before
    True
    """
    with quiet_loggers(LIGHTNING_LOGGERS, level):
        yield


def progress_switch(progress_bar: bool, old_value: bool | None, owner: str, old_name: str = "progress") -> bool:
    """The progress switch of a function whose old keyword ``old_name`` is deprecated.

    Parameters
    ----------
    progress_bar
        The value of the current keyword, ``progress_bar``.
    old_value
        The value passed under the old keyword; ``None`` when it was not passed.
    owner
        The function's name, for the warning.
    old_name
        The old keyword.

    Returns
    -------
    ``old_value`` when it was passed (with a :class:`FutureWarning` naming the new keyword),
    else ``progress_bar``.

    Examples
    --------
    >>> progress_switch(True, None, "run_benchmark")
    True
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     progress_switch(True, False, "run_benchmark")
    False
    >>> str(caught[0].message)
    "run_benchmark's `progress` is deprecated; use `progress_bar`."
    """
    if old_value is None:
        return progress_bar
    warnings.warn(f"{owner}'s `{old_name}` is deprecated; use `progress_bar`.", FutureWarning, stacklevel=3)
    return old_value
