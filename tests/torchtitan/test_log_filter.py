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
