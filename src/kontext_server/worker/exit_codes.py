"""Exit codes of a worker process, shared with the supervisor that restarts it.

Import-light on purpose: the supervisor lives in the API process, which never imports torch.
"""

from __future__ import annotations

__all__ = ["EXIT_DRAINED", "EXIT_EXECUTION_TIMEOUT", "EXIT_START_FAILED"]

EXIT_DRAINED = 0  # SIGTERM: the job in hand was finished or handed back
# A job ran past ``job_timeout_s``; it was failed and the process ended because a stuck CUDA
# call cannot be interrupted. sysexits' EX_TEMPFAIL: a fresh process will do.
EXIT_EXECUTION_TIMEOUT = 75
# The model could not be loaded or warmed up (a missing package, no CUDA for fp8, an OOM in
# warm-up): its state file says why. sysexits' EX_CONFIG: restarting at once would fail again.
EXIT_START_FAILED = 78
