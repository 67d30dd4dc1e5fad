"""The fuzz tier's harness (tests/test_fuzz.py): mutations of what users receive from elsewhere,
and the property every command must keep on them.

Property (issue 33): `pretrain <command>` on a mutated input exits 0 or 2; on 2, stderr is one
line; no traceback; no file outside the input and output directories is created, changed or
removed (victim files that planted links point at included); each run within TIME_S seconds and
MEMORY_BYTES of address space beyond what the process had.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import traceback
import warnings
from pathlib import Path

from hypothesis import event
from hypothesis import strategies as st

from pretrain.cli import main

TIME_S = 120  # a tiny model's command takes seconds (more on a loaded box); this catches hangs
MEMORY_BYTES = 4 << 30  # a tiny model needs MBs; a 10^13-row tensor would need far more

# values a JSON/YAML field may become: scalars of every kind, edge numbers, nesting
_SCALARS = (st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats()
            | st.sampled_from([0, -1, 1, 10**13, 2**62, float("nan"), float("inf"), "", "x",
                               "../../etc/passwd", "/", "pipe:touch PWNED", "4:00:00", "1e-3"])
            | st.text(max_size=12))
VALUES = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=6)


def paths_in(tree, prefix=()) -> list[tuple]:
    """Every key path of a JSON-like tree, the root included."""
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += paths_in(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += paths_in(v, (*prefix, i))
    return out


def mutate_tree(data, tree, rounds: int = 3):
    """`tree` with up to `rounds` fields replaced by drawn values, removed, or added."""
    for _ in range(data.draw(st.integers(1, rounds))):
        path = data.draw(st.sampled_from(paths_in(tree)))
        if not path:
            tree = data.draw(VALUES)
            continue
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "remove":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = data.draw(VALUES)
        else:
            parent[path[-1]] = data.draw(VALUES)
    return tree


def mutate_bytes(data, raw: bytes) -> bytes:
    """Truncated, a byte run overwritten, or bytes inserted."""
    action = data.draw(st.sampled_from(["truncate", "overwrite", "insert"]))
    at = data.draw(st.integers(0, len(raw)))
    if action == "truncate":
        return raw[:at]
    junk = data.draw(st.binary(min_size=1, max_size=16))
    return raw[:at] + junk + raw[at + (len(junk) if action == "overwrite" else 0):]


def snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple]:
    """(kind, size, mtime) of everything under `root` but the `skip` directories."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in filenames:
            st_ = os.lstat(here / name)
            out[str(here / name)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return out


class _TimedOut(BaseException):
    pass


def _alarm(signum, frame):
    raise _TimedOut(f"ran past {TIME_S} s")


def run_command(argv: list[str]) -> tuple[int | str, str]:
    """main(argv) under the time and memory bounds: (exit code or the traceback, stderr)."""
    err = io.StringIO()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fh:
        in_use = int(fh.read().split()[0]) * resource.getpagesize()
    limit = in_use + MEMORY_BYTES
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_S)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            code: int | str = main(argv)
    except BaseException:  # noqa: BLE001 -- a traceback is exactly the finding to report
        code = traceback.format_exc()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def check(argv: list[str], root: Path, writable: tuple[Path, ...], note=None) -> int:
    """Run `argv` and assert the property; `writable`: the input and output directories under
    `root` (the test's directory) the command may change. The exit code."""
    before = snapshot(root, writable)
    code, err = run_command(argv)
    label = f"pretrain {' '.join(map(str, argv))[:300]} ({note})" if note else str(argv)[:300]
    assert isinstance(code, int), f"{label}: traceback\n{code}"
    assert code in (0, 2), f"{label}: exit {code}\n{err[-2000:]}"
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, f"{label}: {len(lines)} lines on stderr\n{err[-2000:]}"
    event(f"exit {code}")
    after = snapshot(root, writable)
    changed = sorted(set(before) ^ set(after) | {k for k in before if after.get(k) != before[k]})
    assert not changed, f"{label}: changed outside its directories: {changed[:5]}"
    return code
