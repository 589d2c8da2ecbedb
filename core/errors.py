"""The error family the CLI turns into one line and an exit code (2, or 1 for a failed check or gate).

Raise these for anything the *user* can fix (a bad file, option, tensor name). Messages are one line and name
the culprit: the file, the tensor, the option. Anything else escaping is a bug in trtkit or in a plugin.

Exit codes are the same for every command (the constants below; docs/index.md#exit-codes has the table).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0  # done; every check and gate passed
EXIT_FAILED = 1  # the command ran, but a check or gate failed (GateError / CheckFailed); or an internal error
EXIT_USAGE = 2  # bad input or usage: a file, option, name or data the user can fix (any other TrtkitError)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM; earlier artefacts are intact


class TrtkitError(Exception):
    """Base class: a problem with the user's input, printed as one line (exit code 2)."""


class InputFileError(TrtkitError):
    """A file given by the user is missing, unreadable, corrupt or of the wrong kind."""


class NotApplicable(InputFileError):
    """An evaluator does not apply to this artefact (e.g. per-layer INT8 error of an FP32 build). A recipe run
    skips that evaluation with one line and goes on; on the command line it is bad input (exit code 2)."""


class OptionError(TrtkitError):
    """An option, or a combination of options, is invalid."""


class UnknownNameError(OptionError):
    """A name (plugin component, tensor, node, recipe key) does not exist."""


class DataError(TrtkitError):
    """Calibration or evaluation data does not fit the model (name, shape, dtype, values)."""


class PluginError(TrtkitError):
    """A plugin is broken: failed to import, or registered something invalid."""


class NumericalCheckError(TrtkitError):
    """A rewritten model's outputs differ from the original's beyond tolerance."""


class BuildError(TrtkitError):
    """A builder could not turn the model into an artefact for its target."""


class CheckFailed(TrtkitError):
    """The command ran fine but what it checked did not pass (a gate, a tolerance, a capability check): exit 1."""


class GateError(CheckFailed):
    """An accuracy gate failed (the evaluation itself ran fine)."""


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean: a, b?)' suffix for an error message, or '' when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(matches)}?)" if matches else ""


def unknown_name(kind: str, name: str, candidates: Iterable[str]) -> UnknownNameError:
    """The standard error for an unknown name, listing close matches or, failing that, the choices."""
    candidates = sorted(candidates)
    hint = close_matches(name, candidates)
    if not hint and candidates and len(candidates) <= 12:
        hint = f" (choices: {', '.join(candidates)})"
    return UnknownNameError(f"unknown {kind} '{name}'{hint}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty.

    Errors shown to users are one line; library exceptions (onnxruntime, TensorRT, torch) carry pages.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
