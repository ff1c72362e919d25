"""edgevoice: a headless voice terminal for Raspberry Pi-class boards, and its relay."""

import os as _os

# numpy's OpenBLAS starts a worker thread per extra core when numpy is imported; edgevoice
# multiplies nothing large enough for them to help (20 ms frames), so they would only be
# one more thread, stack and buffer per process. Set before any module imports numpy;
# an explicit setting in the environment wins.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
