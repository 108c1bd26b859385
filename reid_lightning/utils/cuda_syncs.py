"""Where a loop makes the host wait for its CUDA device: torch's sync debug mode, counted by call site.

``scripts/benchmark_train.py --mode fit --sync-debug`` runs the timed steps of the fit between
``start()`` and ``stop()``::

    syncs = CudaSyncRecorder(torch.device("cuda"))
    syncs.start()          # torch.cuda.set_sync_debug_mode("warn")
    run_steps()
    syncs.stop()
    syncs.count            # synchronising calls in between
    syncs.sites()          # [("reid_lightning/engine/module.py:103 training_step <- ...", 150), ...]

torch flags the calls that wait for the device (``.item()``, ``bool(tensor)``, ``nonzero``, a
blocking copy to the host, ``torch.cuda.synchronize``...) with a warning raised in the calling
thread; the recorder counts each one (Python shows a warning once per place by default) with its
innermost Python frames, and shows every other warning as before. A copy from pageable
host memory to the device is not flagged by torch. On another device the recorder does nothing and
``count`` stays None.
"""
from __future__ import annotations

import traceback
import warnings
from collections import Counter
from typing import Any

import torch

SYNC_WARNING = "called a synchronizing CUDA operation"
# the warning machinery's own frames, left out of a site
_WARNING_FRAMES = ("/warnings.py", "/cuda_syncs.py")


class CudaSyncRecorder:
    """Counts torch's synchronising CUDA calls between :meth:`start` and :meth:`stop`, by site.

    Args:
        device: the device the loop runs on; anything but CUDA records nothing.
        frames: calling frames kept per site, innermost first.
    """

    def __init__(self, device: torch.device | str, frames: int = 3) -> None:
        self.enabled = torch.device(device).type == "cuda"
        self.frames = frames
        self.count: int | None = 0 if self.enabled else None
        self._sites: Counter[str] = Counter()
        self._warnings: warnings.catch_warnings | None = None  # the display and filters to restore
        self._show_other: Any = None

    def start(self) -> None:
        """Turn torch's sync warnings on and record them (a no-op off CUDA or when recording)."""
        if not self.enabled or self._warnings is not None:
            return
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        self._show_other = warnings.showwarning
        warnings.filterwarnings("always", message=SYNC_WARNING)
        warnings.showwarning = self._show
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        """Turn torch's sync warnings off and restore Python's warning display."""
        if self._warnings is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(None, None, None)
        self._warnings = None

    def sites(self, top: int = 5) -> list[tuple[str, int]]:
        """The ``top`` sites with the most synchronising calls: ``(frames, count)``."""
        return self._sites.most_common(top)

    def _show(self, message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
        if SYNC_WARNING not in str(message):
            self._show_other(message, category, filename, lineno, file, line)
            return
        self.count = (self.count or 0) + 1
        stack = [frame for frame in traceback.extract_stack()[:-1] if not frame.filename.endswith(_WARNING_FRAMES)]
        self._sites[" <- ".join(_frame_name(frame) for frame in reversed(stack[-self.frames:]))] += 1


def _frame_name(frame: traceback.FrameSummary) -> str:
    """``path:line function``, the path from the installed package's folder (or the file name)."""
    path = frame.filename.replace("\\", "/")
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/reid_lightning/" in path:
        path = "reid_lightning/" + path.split("/reid_lightning/", 1)[1]
    else:
        path = path.rsplit("/", 1)[-1]
    return f"{path}:{frame.lineno} {frame.name}"
