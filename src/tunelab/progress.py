"""The one place library code reports progress (a tqdm bar on stderr) and sets up logging."""

import logging
import sys

from tqdm.auto import tqdm


_SHOWN = True  # off for the whole process: progress_bar=false, or a rank other than 0


def show_progress(shown: bool) -> None:
    """Turn every progress bar of this process on or off (the engine calls it once per run)."""
    global _SHOWN
    _SHOWN = shown


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = ""):
    return tqdm(total=total, initial=initial, disable=not (enabled and _SHOWN), desc=desc, dynamic_ncols=True, file=sys.stderr)


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s" if debug else "[tunelab] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,  # bind to the current stderr, also when called again in one process
    )
    for noisy in ("absl", "lightning", "lightning.fabric", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "datasets", "transformers", "urllib3", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
