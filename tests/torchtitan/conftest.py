"""The one ``debug_muon_pc`` run that several test files check, trained once per session.

``test_train_runs.py`` (losses, golden curve, TensorBoard, resume, export), ``test_sharded_runs.py`` (export and HF
saves of its checkpoint, resume on other layouts) and ``test_errors_and_recovery.py`` (the uninterrupted reference of
the SIGKILL test, which runs the same command) read the same training: one run instead of three.
"""

from __future__ import annotations

import pytest

from tests.torchtitan._harness import torchrun

MUON_PC_STEPS, MUON_PC_EVERY = 8, 4
MUON_PC_ARGS = (
    "--training.steps", str(MUON_PC_STEPS),
    "--checkpoint.enable", "--checkpoint.interval", str(MUON_PC_EVERY),
    "--metrics.pc_log_freq", str(MUON_PC_EVERY),
)  # fmt: skip
"""PC (degree 5) + Muon for 8 steps; checkpoints at steps 4 and 8; PC metrics every 4 steps."""


@pytest.fixture(scope="session")
def muon_pc_run(tmp_path_factory):
    """``debug_muon_pc`` with :data:`MUON_PC_ARGS` and TensorBoard on (2 ranks)."""
    dump = tmp_path_factory.mktemp("shared") / "debug_muon_pc"
    return torchrun("debug_muon_pc", dump, *MUON_PC_ARGS, "--metrics.enable_tensorboard").check()
