"""lorakit's exception hierarchy.

Every error lorakit raises on purpose derives from :class:`LorakitError`, and also from the built-in
exception that PEFT raises in the same situation (``ValueError`` or ``OSError``), so code
written against PEFT that catches ``ValueError`` keeps working. Each message names the offending thing and
what would have been accepted instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LorakitError(Exception):
    """Base class of every error lorakit raises deliberately."""


class ConfigError(LorakitError, ValueError):
    """A configuration field holds a value lorakit does not accept."""


class TargetNotFoundError(ConfigError):
    """``target_modules`` (or a related selector) matched no module of the model."""


class UnsupportedModuleError(ConfigError):
    """A targeted module is of a type that no adapter layer can wrap."""


class AdapterNotFoundError(LorakitError, ValueError):
    """An adapter name that the model does not hold."""


class AdapterExistsError(LorakitError, ValueError):
    """An adapter name that the model already holds."""


class ShapeMismatchError(LorakitError, ValueError):
    """Adapter weights whose shapes do not fit the model they are loaded into."""


class AdapterFileError(LorakitError, OSError):
    """An adapter folder or file that is missing, unreadable or corrupt."""


class MergeError(LorakitError, ValueError):
    """A merge that would write non-finite values, or a state change that is not allowed while merged."""


class ModelNotFoundError(LorakitError, OSError):
    """A base model that is neither a local folder, nor cached, nor an installed model package."""


class MissingDependencyError(LorakitError, ImportError):
    """An optional package a feature needs is not installed (the message gives the install command)."""


class DataError(LorakitError, ValueError):
    """A training or evaluation data file that cannot be used (the message names the file and the row)."""


class TrainingDivergedError(LorakitError, FloatingPointError):
    """The loss or the trained weights became NaN or infinite; nothing from that step was saved."""


def suggest(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """A ``"; did you mean ...?"`` suffix listing the candidates closest to ``name`` (empty if none)."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
