"""Launcher: ``torchrun --nproc_per_node=N -m torchtitan_ext.train --module torchtitan_ext --config NAME [...]``.

On a machine without a GPU it first installs the CPU shims of :mod:`torchtitan_ext.compat`; then it
runs torchtitan's own ``main()`` unchanged. On a GPU this is ``-m torchtitan.train`` with one log filter
(:class:`torchtitan_ext.compat.QuietLogFilter`): two torchtitan warnings that our configs trigger without
meaning are dropped, and on the CPU the GPU-only ``memory``/``mfu`` fields of the step lines.

At the end it logs one summary line (first and last loss, last grad norm, last GMCN of a PC run).

On the CPU (gloo), after a clean finish, the process runs its ``atexit`` handlers (metric writers, W&B),
flushes its streams and exits with ``os._exit(0)``: gloo occasionally aborts in its C++ teardown after
training has completed and the process group was destroyed, which would otherwise turn a finished run into a
non-zero exit code. On a GPU (NCCL) the process exits normally.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

import torch


def main() -> None:
    cpu = not torch.cuda.is_available()
    if cpu:
        from torchtitan_ext.compat import install_cpu_shims

        install_cpu_shims()
    from torchtitan_ext.compat import install_log_filter

    log_filter = install_log_filter(cpu=cpu)
    from torchtitan.train import main as torchtitan_main

    torchtitan_main()
    if summary := log_filter.summary():
        logging.getLogger().info(summary)
    if cpu:
        _exit_skipping_gloo_teardown()


def _exit_skipping_gloo_teardown() -> None:
    """Run the atexit handlers, flush, then leave before gloo's C++ teardown can abort a finished run."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
