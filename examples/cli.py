"""Command-line helpers the examples share: an argparse parser with one-line errors, checked number
types, output-folder and input-file checks, and the machine's memory for size limits.

This module imports only the standard library, on purpose. The examples parse and check their whole
command line *before* ``import torch`` (which takes seconds, more on a busy machine), so a mistyped flag
is answered at once with one line and exit status 2, never with a traceback::

    train_char_lm.py: error: argument --dropout: must be a number in [0, 1), got 2 (see --help)

Errors that need torch to detect (``--device cuda`` on a CPU-only build, a checkpoint in the wrong
format) come later, also as one line starting ``error:``, with exit status 1.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

# A size flag is refused when the example's own estimate of the memory it needs exceeds this fraction of
# the machine's RAM: far better than a run that swaps for minutes and then dies.
MEMORY_FRACTION = 0.5
FALLBACK_MEMORY_BYTES = 8 * 2 ** 30  # assumed when the total RAM cannot be read (8 GiB)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" once: not when the help text already states its default, and not for
    options whose default is None, False or empty (there is nothing useful to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``<prog>: error: <message> (see --help)``,
    exit status 2, instead of the usage block followed by the error; help shows defaults once."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_range(low: int, high: int | None = None):
    """An argparse ``type``: an integer in [low, high] (no upper limit when high is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"in {low}..{high:,}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def float_range(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """An argparse ``type``: a finite number in the interval from low to high; ``low_open`` /
    ``high_open`` exclude the end points, for example ``float_range(0, 1, high_open=True)`` is [0, 1)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            interval = ("(" if low_open else "[") + f"{low:g}, " + (
                f"{high:g}" + (")" if high_open else "]") if high is not None else "inf)")
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def device_name(text: str) -> str:
    """An argparse ``type`` for ``--device``: auto, cpu, mps, cuda or cuda:N. Whether that device exists
    is checked after torch is imported."""
    if text in ("auto", "cpu", "mps", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")


device_name.__name__ = "device"


def check_output_folder(parser: argparse.ArgumentParser, path: Path, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be created or written: an existing file of that name, a file
    on its path, or a folder without write permission. Creates nothing."""
    if path.exists() and not path.is_dir():
        parser.error(f"{flag} {path}: names an existing file, expected a folder (it is created if missing)")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        parser.error(f"{flag} {path}: {ancestor} is a file, so no folder can be created below it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        parser.error(f"{flag} {path}: no permission to write in {ancestor}")


def check_input_file(parser: argparse.ArgumentParser, path: Path, flag: str) -> None:
    """Refuse an input path that is missing, not a regular file, or unreadable."""
    if not path.exists():
        parser.error(f"{flag} {path}: no such file")
    if not path.is_file():
        parser.error(f"{flag} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        parser.error(f"{flag} {path}: no permission to read it")


def total_memory_bytes() -> tuple[int, str]:
    """(bytes, where the number came from): the machine's total RAM, or a fixed assumption."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "total RAM"
    except (AttributeError, ValueError, OSError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024, "total RAM"
    except (OSError, ValueError, IndexError):
        pass
    return FALLBACK_MEMORY_BYTES, "an assumed 8 GiB (total RAM unknown)"


def check_memory(parser: argparse.ArgumentParser, need_bytes: int, what: str) -> None:
    """Refuse a configuration whose estimated memory exceeds MEMORY_FRACTION of the machine's RAM."""
    total, source = total_memory_bytes()
    limit = MEMORY_FRACTION * total
    if need_bytes > limit:
        parser.error(f"{what} needs an estimated {format_bytes(need_bytes)}, more than "
                     f"{MEMORY_FRACTION:.0%} of {source} ({format_bytes(total)}); choose smaller sizes")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def load_average() -> list | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): the load a timing ran under."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


if __name__ == "__main__":
    print(__doc__)
    print("This module is a library for the example scripts; it has nothing to run.")


def pick_device(name: str):
    """The torch.device named by --device (already checked by ``device_name``): ``auto`` picks CUDA, then
    MPS, then the CPU; a named device that is not there ends the program with a one-line error, exit 1.

    torch is imported here, not at the top, so that parsing the command line never waits for it."""
    import sys

    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            sys.exit(f"error: --device {name}: CUDA is not available here ({build})")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            sys.exit(f"error: --device {name}: there are {torch.cuda.device_count()} CUDA devices (0..)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        sys.exit("error: --device mps: MPS is not available here")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
