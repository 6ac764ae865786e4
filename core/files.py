"""Files a job writes and reruns read back: atomic writes, and the settings a rerun must match.

Atomic writes: a file is written under a hidden temporary name next to its final path
(`.<name>.tmp<pid>`), flushed to disk and renamed, so a file with the final name is always
complete. A kill (even kill -9) leaves at most the hidden temporary file, which globs such as
`*.npz` never match and `temp_pattern` finds for clean-up.

Strict JSON: every JSON file and line written here is valid for strict parsers. Python's json
module would write NaN and Infinity as bare `NaN`/`Infinity` tokens, which JSON does not have;
`finite_json` maps every non-finite float (Python, numpy scalar or array element) to None, so it
is written as `null`, and the writers pass `allow_nan=False` so nothing slips through.

Settings: a job whose output can be resumed records the settings that decide that output;
a rerun with other settings would mix two results, so it is refused with an error that names
each setting that differs (old and new value) and the fix.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import numpy as np

TEMP_PREFIX = "."  # hidden: never matched by a plain glob
TEMP_MARK = ".tmp"


def temp_path(path: str) -> str:
    """The temporary name `atomic_write` uses for `path` in this process."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{TEMP_PREFIX}{name}{TEMP_MARK}{os.getpid()}")


def temp_pattern(name_pattern: str) -> str:
    """Glob of the temporary files of final names matching `name_pattern` (any process)."""
    return f"{TEMP_PREFIX}{name_pattern}{TEMP_MARK}*"


@contextlib.contextmanager
def atomic_write(path: str, *, before_rename=None):
    """Yields a temporary path to write; on success it is fsynced and renamed to `path`.

    The folder is created if needed. On an exception the temporary file is removed and
    `path` is left as it was. `before_rename(tmp)` runs while only the temporary file exists
    (a test hook for kills at the worst moment).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # Data on disk before the name says "complete".
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def json_default(x):
    """JSON form of numpy values, tuples and sets; anything else as its str()."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple | set):
        return list(x)
    return str(x)


def finite_json(obj, default=json_default):
    """`obj` as plain JSON values, NaN and +-inf replaced by None (written as `null`).

    Recurses through dicts, lists and tuples; numpy scalars and arrays (and anything with
    `__array__`, e.g. jax arrays) become numbers and lists; other objects go through `default`
    once. A missing number reads back as null rather than as a token strict parsers reject.
    """
    if isinstance(obj, float):  # np.float64 included
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str | int):  # bool included
        return obj
    if isinstance(obj, dict):
        return {_json_key(k): finite_json(v, default) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v, default) for v in obj]
    if isinstance(obj, np.generic | np.ndarray) or hasattr(obj, "__array__"):
        return finite_json(np.asarray(obj).tolist(), default)
    converted = default(obj)
    if type(converted) is type(obj):  # `default` could not convert it: let json say so
        return converted
    return finite_json(converted, default)


def _json_key(key):
    return key.item() if isinstance(key, np.generic) else key


def json_text(obj, *, default=json_default, indent: int | None = None) -> str:
    """Strict JSON text of `obj` (non-finite floats as null, see `finite_json`)."""
    return json.dumps(finite_json(obj, default), indent=indent, default=default, allow_nan=False)


def as_json(obj, default=json_default):
    """`obj` as it reads back from a JSON file (tuples become lists, numpy scalars numbers,
    NaN/inf None)."""
    return json.loads(json_text(obj, default=default))


def write_json(path: str, obj, *, default=json_default, indent: int = 1) -> None:
    """Writes `obj` as strict JSON to `path` atomically (non-finite floats as null)."""
    text = json_text(obj, default=default, indent=indent)
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_npz(path: str, **arrays) -> None:
    """np.savez to `path` atomically (the name is kept as given: no '.npz' appended)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


# ----------------------------------------------------------------------------- settings

UNSET = object()  # a setting one side does not have
_SHOWN_CHANGES = 12  # a whole changed config is summarised, not printed in full


def _flatten(settings: dict, prefix: str = "") -> dict:
    """Nested dicts as dotted keys, so a change names the innermost setting."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value) -> str:
    return "(not set)" if value is UNSET else repr(value)


def changed_settings(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for each setting that differs, sorted by key; a
    side that lacks the key has the value UNSET."""
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        was, now = a.get(key, UNSET), b.get(key, UNSET)
        if was is UNSET or now is UNSET or was != now:
            changes.append((key, was, now))
    return changes


def setting_changes(old: dict, new: dict) -> list[str]:
    """'key: was X, now Y' for each (dotted) setting that differs, sorted by key."""
    return [describe_change(*change) for change in changed_settings(old, new)]


def describe_change(key: str, was, now) -> str:
    return f"{key}: was {_show(was)}, now {_show(now)}"


def other_settings_message(changes: list[str], *, what: str, fix: str) -> str:
    """ "<what> with other settings (<each change, old and new>). <fix>", long lists cut."""
    shown = "; ".join(changes[:_SHOWN_CHANGES])
    if len(changes) > _SHOWN_CHANGES:
        shown += f"; and {len(changes) - _SHOWN_CHANGES} more"
    return f"{what} with other settings ({shown}). {fix}"


def refuse_other_settings(old: dict, new: dict, *, what: str, fix: str, error=ValueError):
    """Raises `error` when the saved settings `old` differ from `new` (as JSON reads them),
    with the message of `other_settings_message`."""
    changes = setting_changes(old, as_json(new))
    if changes:
        raise error(other_settings_message(changes, what=what, fix=fix))


def check_or_record_settings(
    path: str, settings: dict, *, what: str, fix: str, error=ValueError, write: bool = True
) -> None:
    """Refuses `settings` that differ from those recorded in the JSON file `path`; records
    them there (atomically) when the file does not exist yet and `write` is set."""
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        refuse_other_settings(old, settings, what=what, fix=fix, error=error)
    elif write:
        write_json(path, as_json(settings))
