"""Helpers shared by the benchmark scripts in this folder.

The scripts are run as `.venv/bin/python benchmarks/<script>.py`, so this folder is
`sys.path[0]` and they import this module as `_common`. It needs only the standard
library at import time: JAX is imported inside the functions that describe it, because
bench_discrete.py's Pyro worker imports the script (and so this module) under an
interpreter without JAX.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the repository
RESULTS = HERE / "RESULTS.md"
RESULTS_HEADER = (
    "# Benchmark results\n\n"
    "Appended by the scripts in this folder (see README.md); newest last. Ratios are "
    "to the hand-written JAX equivalent in the same run.\n"
)


def pin_threads_unless_default(argv: Sequence[str]) -> bool:
    """Pin XLA and the BLAS/OpenMP libraries to one thread unless `argv` asks for
    `--threads default`; returns whether it pinned. Call it before jax or numpy is imported
    (the settings are read when they load)."""
    for i, arg in enumerate(argv):
        if arg == "--threads=default" or (arg == "--threads" and argv[i + 1:i + 2] == ["default"]):
            return False
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                               "=false intra_op_parallelism_threads=1").strip()
    return True


def log(msg: str) -> None:
    print(msg, flush=True)


def short_exception(exc: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message` (at most `limit` characters of it)."""
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(exc).__name__}: {first[:limit]}"


def fmt(value, spec: str) -> str:
    """`format(value, spec)`, or "n/a" for None."""
    return "n/a" if value is None else format(value, spec)


def markdown_table(columns: Sequence[str], align: str, rows: Iterable[Sequence]) -> str:
    """A markdown table: `columns` the header cells, `align` one letter per column ("l" or
    "r"), `rows` sequences of cells (formatted with str; a row shorter than the header is
    padded with empty cells)."""

    def line(cells):
        cells = list(cells) + [None] * (len(columns) - len(cells))
        return "|" + "".join(" |" if c is None else f" {c} |" for c in cells)

    sep = "|" + "".join({"l": "---|", "r": "---:|"}[a] for a in align)
    return line(columns) + "\n" + sep + "\n" + "\n".join(line(r) for r in rows) + "\n"


def command_line(argv: Sequence[str] | None, script: str) -> str:
    """The command as run (interpreter and `sys.argv`), or `script argv...` when `main`
    was called with an explicit `argv`."""
    if argv is None:
        return " ".join([Path(sys.executable).as_posix(), *sys.argv])
    return " ".join([script, *argv])


def versions(modules: Iterable[str], extra: Iterable[str] = ()) -> str:
    """`jax X, mod Y, ...` for the installed `modules` (missing ones left out), then `extra`."""
    from importlib.metadata import version

    import jax

    parts = [f"jax {jax.__version__}"]
    for mod in modules:
        with contextlib.suppress(Exception):
            parts.append(f"{mod} {version(mod)}")
    parts += list(extra)
    return ", ".join(parts)


def git_revision(paths: Sequence[str] = ("ppl_ext",)) -> str:
    """Short HEAD revision, noting uncommitted changes under any of `paths` (folders of
    the repository)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    where = " or ".join(f"{p}/" for p in paths)
    return head + (f" + uncommitted changes under {where}" if dirty else "")


def machine() -> str:
    """OS, architecture, CPU count and model, JAX backend."""
    import jax

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dev = jax.devices()[0]
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), "
            f"jax backend {dev.platform} ({len(jax.devices())} device(s))")


def load_average() -> str:
    """The 1-minute load average, formatted."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def results_heading(script: str, command: str, version_line: str,
                    git_paths: Sequence[str] = ("ppl_ext",)) -> str:
    """The start of a RESULTS.md section: title with the date, command line, versions and
    the git revision. The caller goes on with its `- machine: ...` line."""
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return (f"## {script} — {stamp}\n\n"
            f"- command: `{command}`\n"
            f"- {version_line}; ppl_ext at git {git_revision(git_paths)}\n")


def append_results(text: str, path: Path = RESULTS) -> None:
    if not path.exists():
        path.write_text(RESULTS_HEADER)
    with path.open("a") as fh:
        fh.write("\n" + text)


def report(body: str, no_results: bool) -> int:
    """Print the section and append it to RESULTS.md (unless `no_results`); returns 0."""
    print()
    print(body)
    if not no_results:
        append_results(body)
        log(f"appended to {RESULTS}")
    return 0


class PeerWorker:
    """The main process's end of a peer library running in a subprocess under another
    interpreter (its own virtual environment): one JSON object a line each way.

    The subprocess is `python script *args`; `XLA_FLAGS` (the main side's JAX pinning) is
    not passed on. `name` names the peer in errors."""

    def __init__(self, python, script, args: Sequence[str] = (), name: str = "peer",
                 env: dict | None = None, cwd=None):
        import json

        self._json = json
        self.name = name
        environ = dict(os.environ)
        environ.pop("XLA_FLAGS", None)
        environ.update(env or {})
        self.proc = subprocess.Popen([str(python), str(script), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env=environ, cwd=None if cwd is None else str(cwd))

    def send(self, message: dict) -> None:
        self.proc.stdin.write(self._json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited (code {self.proc.poll()})")
        return self._json.loads(line)

    def ask(self, message: dict) -> dict:
        """Send one message and read one answer."""
        self.send(message)
        return self.read()

    def close(self, timeout: float = 300) -> None:
        """Close its input and wait for it; a worker still busy after `timeout` seconds (a
        loaded machine) is killed, so the results already read are kept."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()

