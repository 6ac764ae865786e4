"""What a failed orbax read means, in one line: the file or array that is missing or unreadable
(`problem`), or a short summary of a structure mismatch (`summary`).

orbax reports a damaged checkpoint through TensorStore: an `Exception('Encountered error while
reading array index ...')` holding a dump of the TensorStore spec, caused by a ValueError such
as 'OUT_OF_RANGE: Error reading "params.x/0.0" in OCDBT database at local file "...": Requested
byte range ... is not valid for value of size ...'. The array's name and the reason are in that
cause; the rest is noise.
"""

from __future__ import annotations

import logging
import os
import re
import sys

# TensorStore's words for a file it cannot read (not for a target of another shape).
_STATUS = re.compile(r"\b(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|UNAVAILABLE)\b: ")
_OCDBT_KEY = re.compile(
    r'(?P<code>[A-Z_]+): .*?"(?P<key>[^"]+)" in OCDBT database at [^"]*"[^"]*":?\s*'
    r"(?P<why>.*?)(?:;| \[tensorstore_spec|$)",
    re.M,
)
_READING = "error while reading array"  # orbax's wrapper around TensorStore's error


def _chain(err: BaseException | None) -> list[BaseException]:
    chain = []
    while err is not None and len(chain) < 10:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def array_problem(err: BaseException) -> str | None:
    """One line on the array TensorStore could not read; None when `err` is not about files."""
    chain = _chain(err)
    for e in chain:
        match = _OCDBT_KEY.search(str(e))
        if match:
            name = match["key"].rsplit("/", 1)[0]
            return f"array {name} cannot be read ({match['code']}: {match['why'].strip()})"
    for e in chain:
        if isinstance(e, OSError) or _STATUS.search(str(e)):
            return f"a file cannot be read ({first_line(e)})"
    if any(_READING in str(e) for e in chain):
        return f"an array cannot be read ({first_line(err)})"
    return None


def file_problem(step_dir: str, relative: str, err: BaseException | None) -> str:
    """What is wrong with the file `relative` (e.g. 'state/_METADATA') of a step's folder."""
    folder = os.path.dirname(relative)
    if not os.path.isdir(os.path.join(step_dir, folder)):
        return f"its folder {folder}/ is missing"
    if not os.path.exists(os.path.join(step_dir, relative)):
        return f"{relative} is missing"
    # An OCDBT checkpoint (one ocdbt.process_N folder per writer) indexes its arrays here.
    state = os.path.join(step_dir, "state")
    ocdbt = os.path.isdir(state) and any(n.startswith("ocdbt.") for n in os.listdir(state))
    if ocdbt and not os.path.exists(os.path.join(state, "manifest.ocdbt")):
        return "state/manifest.ocdbt is missing"
    found = array_problem(err) if err is not None else None
    return found or f"{relative} cannot be read ({first_line(err)})"


def first_line(err: BaseException | None, limit: int = 200) -> str:
    if err is None:
        return "unreadable"
    line = (str(err).strip().splitlines() or [""])[0]
    text = f"{type(err).__name__}: {line}" if line else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary(err: BaseException) -> str:
    """orbax's error in one short line: its first sentence, and the tree path it names if any
    (its message goes on with both trees in full, or with advice on padding arrays)."""
    lines = [x.strip() for x in str(err).strip().splitlines() if x.strip()] or [""]
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text[:-1]} at {lines[1].rstrip(':')}"
    elif ". " in text:
        text = text[: text.index(". ")]
    return text if len(text) <= 300 else text[:297] + "..."


def _leftover(err: BaseException | None) -> bool:
    if err is None:
        return False
    if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
        return True
    return any(_READING in str(e) or _STATUS.search(str(e)) for e in _chain(err))


_quiet = False


def quiet_leftovers() -> None:
    """orbax stops at the first array it cannot read and leaves the other reads failing
    unobserved; when they are collected Python reports each ('Exception ignored in ...',
    'Task exception was never retrieved', 'Event loop is closed'): thousands of lines after
    the two-line error. From the first unreadable checkpoint on, those reports (only those)
    are dropped for the rest of the process."""
    global _quiet
    if _quiet:
        return
    _quiet = True
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _leftover(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: not (record.exc_info and _leftover(record.exc_info[1]))
    )
