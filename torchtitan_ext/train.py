"""Launcher: ``torchrun --nproc_per_node=N -m torchtitan_ext.train --module torchtitan_ext --config NAME [...]``.

On a machine without a GPU it first installs the CPU shims of :mod:`torchtitan_ext.compat`; then it
runs torchtitan's own ``main()`` unchanged. On a GPU this is ``-m torchtitan.train`` with one log filter
(:class:`torchtitan_ext.compat.QuietLogFilter`): two torchtitan warnings that our configs trigger without
meaning are dropped, and on the CPU the GPU-only ``memory``/``mfu`` fields of the step lines.

After a clean finish the process exits with ``os._exit(0)``: gloo occasionally aborts in its C++
teardown after training has completed and the process group was destroyed, which would otherwise
turn a finished run into a non-zero exit code.
"""

from __future__ import annotations

import os
import sys

import torch


def main() -> None:
    cpu = not torch.cuda.is_available()
    if cpu:
        from torchtitan_ext.compat import install_cpu_shims

        install_cpu_shims()
    from torchtitan_ext.compat import install_log_filter

    install_log_filter(cpu=cpu)
    from torchtitan.train import main as torchtitan_main

    torchtitan_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
