"""Memory-allocator settings for training on CPU.

A training step allocates and frees the same few hundred activation and gradient buffers of a few
MiB each, step after step. glibc's malloc, by default, serves blocks above a threshold that it
raises as it goes (up to 32 MiB) with fresh ``mmap`` calls and returns free memory at the top of
the heap to the system. Each step then faults its buffers' pages in again (measured on SmolLM2-
135M: 0.1-1 million page faults and about a second per step) and the heap fragments as the
threshold moves. Fixing the threshold at 32 MiB and keeping freed memory in the process makes
steady-state steps fault-free; only the few tensors of 32 MiB or more (the output head's, the
optimizer's) keep their own mappings. See bench/ for the measured effect.
"""

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1

# A quantised base (QLoRA) dequantises every weight afresh in each forward and backward pass. Served
# from the heap, those temporaries of one to a few MiB fragment it: QLoRA on SmolLM2-135M grew to a
# 5.9 GiB peak over its first steps (LoRA: 5.3). Above 1 MiB every block gets its own mapping and
# goes back to the system when freed: 2.8 GiB, in exchange for page faults in every step.
QUANTIZED_MMAP_THRESHOLD = 2**20
DEFAULT_MMAP_THRESHOLD = 32 * 2**20


def tune_cpu_allocator(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Apply the settings above to this process's glibc malloc; False where there is no glibc
    (macOS, Windows, musl), which is left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1 and ok
    if not ok:
        log.warning("Could not tune glibc malloc (mallopt refused); continuing with its defaults")
    return ok
