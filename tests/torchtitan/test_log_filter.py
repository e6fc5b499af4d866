"""torchtitan_ext.compat.QuietLogFilter on the messages torchtitan 0.3 logs (produced by torchtitan itself)."""

from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.torchtitan

pytest.importorskip("torchtitan")

from torchtitan.components.checkpoint import CheckpointManager  # noqa: E402
from torchtitan.protocols.state_dict_adapter import StateDictAdapter  # noqa: E402

from torchtitan_ext.compat import QuietLogFilter, install_log_filter  # noqa: E402
from torchtitan_ext.data import TOKENIZER_DIR  # noqa: E402


class _Adapter(StateDictAdapter):
    def to_hf(self, state_dict):
        return state_dict

    def from_hf(self, hf_state_dict):
        return hf_state_dict


@pytest.fixture
def root_records():
    """Records that reach the root logger's handlers (after its logger-level filters)."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    root = logging.getLogger()
    handler, level = _Keep(level=logging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield records
    root.removeHandler(handler)
    root.setLevel(level)
    for f in [f for f in root.filters if isinstance(f, QuietLogFilter)]:
        root.removeFilter(f)


def _messages(records):
    return [r.getMessage() for r in records]


def test_config_warnings_from_our_configs_are_dropped(root_records, tmp_path):
    CheckpointManager.Config()  # torchtitan's defaults: warns about initial_load_model_only
    _Adapter(None, str(TOKENIZER_DIR))  # our tokenizer folder: no weight index
    before = _messages(root_records)
    assert any(m.startswith("initial_load_model_only=True has no effect") for m in before)
    assert any(f"not found at hf_assets_path: {TOKENIZER_DIR}" in m for m in before)

    root_records.clear()
    install_log_filter(cpu=False)
    CheckpointManager.Config()
    _Adapter(None, str(TOKENIZER_DIR))
    _Adapter(None, str(tmp_path))  # someone else's folder without an index: still warned about
    after = _messages(root_records)
    assert after and all(str(tmp_path) in m for m in after), after


def test_cpu_step_lines_lose_the_gpu_only_fields():
    f = QuietLogFilter(TOKENIZER_DIR, cpu=True)
    line = (
        "\x1b[31mstep:  8  \x1b[32mloss:  6.86704  \x1b[38;2;180;60;0mgrad_norm:  1.4499  "
        "\x1b[36mmemory: -0.00GiB(-0.00%)  \x1b[34mtps: 242  \x1b[36mtflops: 0.01  \x1b[35mmfu: 0.00%\x1b[39m"
    )
    record = logging.LogRecord("root", logging.INFO, __file__, 1, line, None, None)
    assert f.filter(record)
    assert record.msg == (
        "\x1b[31mstep:  8  \x1b[32mloss:  6.86704  \x1b[38;2;180;60;0mgrad_norm:  1.4499  "
        "\x1b[34mtps: 242  \x1b[36mtflops: 0.01\x1b[39m"
    )
    plain = "step:  1  loss:  5.5  grad_norm:  1.0  memory:  3.10GiB(4.00%)  tps: 9  tflops: 0.00  mfu: N/A"
    record = logging.LogRecord("root", logging.INFO, __file__, 1, plain, None, None)
    assert f.filter(record) and record.msg == "step:  1  loss:  5.5  grad_norm:  1.0  tps: 9  tflops: 0.00"
    gpu = logging.LogRecord("root", logging.INFO, __file__, 1, plain, None, None)
    assert QuietLogFilter(TOKENIZER_DIR, cpu=False).filter(gpu) and gpu.msg == plain  # GPUs keep them
    flops = logging.LogRecord(
        "root", logging.WARNING, __file__, 1, "Peak flops undefined for: CPU, x", None, None
    )
    assert not f.filter(flops)


def _record(msg, *args, name="root", level=logging.INFO):
    return logging.LogRecord(name, level, __file__, 1, msg, args or None, None)


# Lines a gloo/CPU run of torchtitan 0.3.0 logs, as printed in a run of debug_muon_pc (issue 21's list).
CPU_NOISE = [
    _record("ENV[TORCH_NCCL_ASYNC_ERROR_HANDLING] = 1 will be overridden to 3 based on job config"),
    _record("CUDA graph capture is only supported on NVIDIA CUDA; using eager execution."),
    _record(
        "[Override] torchtitan_ext.cpu_attention.dense_attention: model_spec.model.layers.0.attention."
        "inner_attention FlexAttention.Config -> DenseMaskAttention.Config"
    ),
    _record("[GC] %s took %.2f seconds", "Initial GC collection", 0.0),
    _record("Sleeping 2 seconds for other ranks to complete"),
]
KEPT = [
    _record("Applied 6 override(s)"),
    _record("Training starts at step 1"),
    _record("Training completed"),
    _record("Trainer is initialized with local batch size 2, global batch size 4"),
]


def test_cpu_noise_is_dropped_and_what_a_user_needs_is_kept():
    cpu, gpu = QuietLogFilter(TOKENIZER_DIR, cpu=True), QuietLogFilter(TOKENIZER_DIR, cpu=False)
    assert [cpu.filter(r) for r in CPU_NOISE] == [False] * len(CPU_NOISE)
    assert all(cpu.filter(r) for r in KEPT)
    assert all(gpu.filter(r) for r in CPU_NOISE)  # on a GPU these lines are not noise


def test_cpu_python_warnings_are_silenced_others_are_not():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        install_log_filter(cpu=True)
        warnings.warn(
            "DTensor random operators may not have complete support on cpu device mesh",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn(
            "DTensor manual_seed() may not have complete support on cpu device mesh",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn("'set_vital' is deprecated, please do not call", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
    root = logging.getLogger()
    for f in [f for f in root.filters if isinstance(f, QuietLogFilter)]:
        root.removeFilter(f)
        logging.getLogger("torchtitan_ext.metrics").removeFilter(f)


def test_summary_reports_first_and_last_loss_and_the_last_gmcn():
    f = QuietLogFilter(TOKENIZER_DIR, cpu=True)
    assert f.summary() is None  # nothing trained: no summary
    for step, loss, gnorm in ((1, "8.08314", "1.0519"), (2, "7.91473", "1.0583"), (3, "7.62880", "0.9649")):
        line = f"\x1b[31mstep: {step:2d}  \x1b[32mloss: {loss:>8}  \x1b[38;2;180;60;0mgrad_norm: {gnorm:>7}  tps: 9"
        assert f.filter(_record(line))
        if step in (2, 3):
            metrics = {"pc/sigma_mean": 0.53, "pc/gmcn": 39.14983 + step}
            assert f.filter(_record("step %d PC metrics: %s", step, metrics, name="torchtitan_ext.metrics"))
    assert f.summary() == (
        "Run summary: steps 1-3, loss 8.08314 at step 1, 7.62880 at step 3, grad_norm 0.9649, "
        "GMCN 42.15 at step 3 (PC metrics; see docs/torchtitan.md#gmcn)"
    )
    # The summary must not look like a step line to tools that parse them (tests/torchtitan/_harness.py).
    from tests.torchtitan._harness import STEP_RE

    assert not STEP_RE.search(f.summary())


def test_baseline_summary_has_no_gmcn():
    f = QuietLogFilter(TOKENIZER_DIR, cpu=False)
    f.filter(_record("step:  1  loss:  5.5  grad_norm:  1.0  tps: 9"))
    assert f.summary() == "Run summary: steps 1-1, loss 5.5 at step 1, 5.5 at step 1, grad_norm 1.0"


@pytest.mark.parametrize("cuda", [False, True])
def test_launcher_exits_early_only_on_cpu_and_after_atexit(monkeypatch, cuda):
    """os._exit(0) skips gloo's C++ teardown on the CPU; a GPU run returns normally (atexit runs as usual)."""
    import atexit

    import torch
    import torchtitan.train

    import torchtitan_ext.compat as compat
    from torchtitan_ext import train

    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(compat, "install_cpu_shims", lambda: events.append("shims"))
    monkeypatch.setattr(torchtitan.train, "main", lambda: events.append("train"))
    monkeypatch.setattr(train.os, "_exit", lambda code: events.append(f"_exit({code})"))
    # Running the real handlers would tear down this pytest process: record the call instead.
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: events.append("atexit"))
    monkeypatch.setattr(logging, "shutdown", lambda: events.append("logging.shutdown"))
    try:
        train.main()
    finally:
        root = logging.getLogger()
        for f in [f for f in root.filters if isinstance(f, QuietLogFilter)]:
            root.removeFilter(f)
            logging.getLogger("torchtitan_ext.metrics").removeFilter(f)
    if cuda:
        assert events == ["train"]
    else:
        assert events == ["shims", "train", "atexit", "logging.shutdown", "_exit(0)"]
