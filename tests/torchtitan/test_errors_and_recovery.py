"""torchtitan_ext reliability: bad input as a table, checkpoints that survive a kill, layout mismatches.

* ``ERRORS``: bad configs and bad checkpoints -> exception type + message regex (in process, no torchrun).
  The end-to-end bad configs (PC targets matching nothing, Muon given 1-D parameters, ``full_dtensor``
  on torch < 2.14) are in ``test_train_runs.py``: they must fail before step 1 of a real run.
* Partial checkpoints: a step folder without DCP's completion marker (``.metadata``) is never loaded,
  and a save that overwrites a complete folder removes the old marker first.
* Kill test: a 2-rank run is SIGKILLed (torchrun and its workers, which run in their own sessions)
  after its step-4 checkpoint and two more steps; a partially written step-8 folder is planted; the
  same command resumes from step 4 and gives the uninterrupted run's losses and final checkpoint bit
  for bit (the uninterrupted run is the shared one of ``conftest.py``, the same command).
* A PC checkpoint continues in a config without PC the way the layout error says: export, then
  ``--checkpoint.initial_load_in_hf``; the dense model computes what the PC model computes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.torchtitan

pytest.importorskip("torchtitan")

import torch.distributed.checkpoint as dcp  # noqa: E402
from torchtitan.components.checkpoint import AsyncMode, ModelWrapper  # noqa: E402

import pcopt  # noqa: E402
from tests.torchtitan._harness import COMMON, REPO, parse_steps, torchrun  # noqa: E402
from tests.torchtitan.conftest import MUON_PC_ARGS, MUON_PC_EVERY, MUON_PC_STEPS  # noqa: E402
from torchtitan_ext.checkpoint import PCCheckpointManager  # noqa: E402
from torchtitan_ext.config_registry import llama2_model  # noqa: E402
from torchtitan_ext.pc import PCConverter, attach_pc  # noqa: E402
from torchtitan_ext.processes import descendants  # noqa: E402

TORCH_2_14 = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)
ALL_TARGETS = None  # PCConverter's default: attention.wo and feed_forward.w1/w2/w3
W1_ONLY = r"^layers\.\d+\.feed_forward\.w1$"
MODEL_ONLY = ["dataloader", "optimizer", "lr_scheduler"]  # resume the model part of a folder's checkpoint


# ---------------------------------------------------------------------------------------------------
# Small models and checkpoints (1 layer of the debug model, one process)
# ---------------------------------------------------------------------------------------------------
def _model(
    pc: bool, targets: str | None = ALL_TARGETS, *, meta: bool = False, mode: str = "auto"
) -> torch.nn.Module:
    cfg = None
    if pc:
        cfg = (
            PCConverter.Config(degree=5, mode=mode)
            if targets is None
            else PCConverter.Config(degree=5, targets=targets, mode=mode)
        )
    spec = llama2_model("debug", pc=cfg)
    spec.model.layers = spec.model.layers[:1]
    with torch.device("meta"):
        model = spec.model.build()
    if meta:
        return model
    attach_pc(model)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    return model


def _save(model: torch.nn.Module, checkpoint_id: Path, drop: tuple[str, ...] = ()) -> None:
    sd = {k: v for k, v in ModelWrapper([model]).state_dict().items() if k not in drop}
    sd["lr_scheduler"] = {"last_epoch": torch.tensor(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is not initialized": single-process save
        dcp.save(sd, checkpoint_id=str(checkpoint_id))


def _manager(model, base: Path, folder: str = "run", **config) -> PCCheckpointManager:
    return PCCheckpointManager.Config(enable=True, folder=folder, **config).build(
        dataloader=None,
        model_parts=[model],
        optimizers=None,
        lr_schedulers=None,
        states={},
        sd_adapter=None,
        base_folder=str(base),
    )


def _load(model, base: Path, folder: str = "run", **config) -> bool:
    manager = _manager(model, base, folder, **config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return manager.load()
    finally:
        manager.close()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """``<root>/{pc,dense,w1_only}/step-3``: the same 1-layer model with PC on all targets, none, w1 only;
    ``<root>/dense_broken/step-3``: dense, without ``layers.0.feed_forward.w1.weight``."""
    root = tmp_path_factory.mktemp("layouts")
    _save(_model(pc=True), root / "pc" / "step-3")
    dense = _model(pc=False)
    _save(dense, root / "dense" / "step-3")
    _save(dense, root / "dense_broken" / "step-3", drop=("layers.0.feed_forward.w1.weight",))
    _save(_model(pc=True, targets=W1_ONLY), root / "w1_only" / "step-3")
    return root


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------
def _convert(**kw):
    spec = llama2_model("debug")
    return PCConverter.Config(**kw).build().convert(spec.model)


def _convert_twice():
    spec = llama2_model("debug", pc=PCConverter.Config(degree=5))
    return PCConverter.Config(degree=5).build().convert(spec.model)


def _convert_without_param_init():
    spec = llama2_model("debug")
    spec.model.layers[0].feed_forward.w1.param_init = None
    return PCConverter.Config(degree=5).build().convert(spec.model)


def _parallelize_with_tp():
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims

    from torchtitan_ext.pc import parallelize_llama_pc

    pd = ParallelDims(
        dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=1, ep=1, world_size=2, spmd_backend="partial_dtensor"
    )
    parallelize_llama_pc(
        _model(pc=True, meta=True, mode="per_forward"),  # per forward: the map needs the whole matrix
        parallel_dims=pd,
        training=TrainingConfig(),
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor", tensor_parallel_degree=2),
        compile_config=CompileConfig(),
        ac_config=None,
        dump_folder="",
    )


def _spmd(backend):
    from torchtitan_ext.compat import check_spmd_backend

    check_spmd_backend(backend)


def _optimizer(config):
    config.build(model_parts=[_model(pc=True)])


def _adamw(**kw):
    from torchtitan_ext.optimizer import adamw_config

    return adamw_config(1e-3, **kw)


def _muon(lr=1e-3, **kw):
    from torchtitan_ext.optimizer import muon_config

    return muon_config(lr, **kw)


def _refresh_zero():
    from torchtitan_ext.optimizer import PCOptimizersContainer

    cfg = _adamw()
    return PCOptimizersContainer.Config(param_groups=cfg.param_groups, pc_refresh_iterations=0)


def _metrics(**kw):
    from torchtitan_ext.metrics import PCMetricsProcessor

    PCMetricsProcessor.Config(**kw)


def _text(path):
    from torchtitan_ext.data import load_text_dataset

    load_text_dataset(str(path))


def _csv_file(tmp: Path) -> Path:
    (tmp / "corpus.csv").write_text("text\nhello\n")
    return tmp / "corpus.csv"


def _record_without_text():
    from torchtitan_ext.data import _text_field

    _text_field({"content": "In the beginning"})


def _export_unknown_config():
    from torchtitan_ext.export import load_trainer_config

    load_trainer_config("debug_sgd")


def _export_not_a_checkpoint(tmp: Path):
    from torchtitan_ext.export import load_checkpoint

    load_checkpoint(torch.nn.Linear(2, 2), tmp)


EXPORT_HINT = (
    r"python -m torchtitan_ext\.export --config <the PC config> --checkpoint .*step-3 --output <dir>"
)

# (id, call(ckpts, tmp_path), exception type, message regex)
ERRORS = [
    (
        "PC targets not a regex",
        lambda c, t: _convert(targets="(", degree=5),
        ValueError,
        r"PC targets '\(' is not a valid regex",
    ),
    (
        "PC degree unsupported",
        lambda c, t: _convert(degree=4),
        ValueError,
        r"Unsupported PC polynomial degree: expected one of \[3, 5, 7, 9\], got 4\. Pass degree=3, 5, 7 or 9",
    ),
    (
        "PC converter applied twice",
        lambda c, t: _convert_twice(),
        ValueError,
        r"layers\.0\.attention\.wo already has the PC layer; apply PCConverter once",
    ),
    (
        "PC target without a weight initialiser",
        lambda c, t: _convert_without_param_init(),
        ValueError,
        r"PC target layers\.0\.feed_forward\.w1 has no param_init\['weight'\]; set it",
    ),
    pytest.param(
        "spmd_types on torch < 2.14",
        lambda c, t: _spmd("spmd_types"),
        ValueError,
        r"spmd_backend='spmd_types' is refused on torch .*supports spmd_types only from torch 2\.14\. "
        r"Use --parallelism\.spmd_backend partial_dtensor",
        marks=pytest.mark.skipif(TORCH_2_14, reason="refused only on torch < 2.14"),
    ),
    pytest.param(
        "unknown spmd backend",
        lambda c, t: _spmd("nccl_dtensor"),
        ValueError,
        r"spmd_backend='nccl_dtensor' is refused on torch .*it is not a known backend",
        marks=pytest.mark.skipif(TORCH_2_14, reason="checked by torchtitan on torch >= 2.14"),
    ),
    (
        "PC per forward with tensor parallelism",
        lambda c, t: _parallelize_with_tp(),
        ValueError,
        r"tensor parallelism with PC once per step .* got tensor_parallel_degree=2, context_parallel_degree=1, "
        r"PC strategy \['per_forward'\]\. .*use once per step \(a _pc config, not _per_forward\) with tensor parallelism",
    ),
    (
        "unknown optimizer name",
        lambda c, t: _optimizer(_adamw(name="Lion")),
        ValueError,
        r"Unknown optimizer_name 'Lion': expected one of 'Muon', 'AdamW', 'Adam', 'DistMuon'",
    ),
    (
        "zero PC refresh iterations",
        lambda c, t: _optimizer(_refresh_zero()),
        ValueError,
        r"optimizer\.pc_refresh_iterations must be >= 1 or None, got 0",
    ),
    (
        "Muon negative lr through the container",
        lambda c, t: _optimizer(_muon(lr=-1.0)),
        ValueError,
        r"Invalid learning rate: -1\.0\. Expected lr >= 0",
    ),
    (
        "Muon matrices pattern not a regex",
        lambda c, t: _muon(matrices="(wq"),
        ValueError,
        r"muon_config: matrices='\(wq' is not a valid regex .* Pass a pattern searched in parameter FQNs",
    ),
    (
        "negative PC log frequency",
        lambda c, t: _metrics(pc_log_freq=-1),
        ValueError,
        r"metrics\.pc_log_freq must be >= 0 \(0 disables it\), got -1",
    ),
    (
        "PC log frequency not a multiple of log_freq",
        lambda c, t: _metrics(log_freq=2, pc_log_freq=3),
        ValueError,
        r"metrics\.pc_log_freq \(3\) must be a multiple of metrics\.log_freq \(2\)",
    ),
    (
        "PC checkpoint resumed without PC",
        lambda c, t: _load(_model(pc=False), c, folder="pc"),
        RuntimeError,
        r"was written with the PC layer on 4 matrices this model has without it \(e\.g\. it holds "
        r"'layers\.0\.attention\.wo\.parametrizations\.weight\.original' where this model expects "
        r"'layers\.0\.attention\.wo\.weight'\)\. To resume it, use the config it was trained with .*"
        + EXPORT_HINT
        + r".*--checkpoint\.initial_load_in_hf",
    ),
    (
        "PC checkpoint as the initial load without PC",
        lambda c, t: _load(_model(pc=False), t, initial_load_path=str(c / "pc" / "step-3")),
        RuntimeError,
        r"was written with the PC layer on 4 matrices this model has without it.*" + EXPORT_HINT,
    ),
    (
        "dense checkpoint resumed with PC",
        lambda c, t: _load(_model(pc=True), c, folder="dense"),
        ValueError,
        r"dense/step-3 holds dense weights \(no PC keys\) and this model has the PC layer, so only its model "
        r"weights can be loaded, but \['dataloader', 'lr_scheduler', 'optimizer'\] were requested too .* use an "
        r"empty --checkpoint\.folder and --checkpoint\.initial_load_path .*dense/step-3",
    ),
    (
        "checkpoint with other PC targets",
        lambda c, t: _load(_model(pc=True), c, folder="w1_only"),
        RuntimeError,
        r"has the PC layer on other matrices than this model: it holds dense weights for 3 of this model's PC "
        r"matrices \(e\.g\. 'layers\.0\.attention\.wo\.weight'\)\. Resume it with the PC targets",
    ),
    (
        "checkpoint with more PC targets",
        lambda c, t: _load(_model(pc=True, targets=W1_ONLY), c, folder="pc"),
        RuntimeError,
        r"was written with the PC layer on 3 matrices this model has without it",
    ),
    (
        "dense checkpoint missing a PC matrix",
        lambda c, t: _load(_model(pc=True), t, initial_load_path=str(c / "dense_broken" / "step-3")),
        RuntimeError,
        r"has neither PC keys nor dense weights for \['layers\.0\.feed_forward\.w1\.parametrizations\.weight"
        r"\.original'\] \(expected '<module>\.weight'\)",
    ),
    (
        "export of an unknown config",
        lambda c, t: _export_unknown_config(),
        ValueError,
        r"torchtitan_ext\.config_registry has no config function 'debug_sgd'\. Pass one of \[.*'debug_muon_pc'",
    ),
    (
        "export of a folder that is not a checkpoint",
        lambda c, t: _export_not_a_checkpoint(t),
        ValueError,
        r"is not a DCP checkpoint folder \(no \.metadata\)\. Pass a step folder",
    ),
    (
        "text dataset without a path",
        lambda c, t: _text(""),
        ValueError,
        r"The 'text' dataset needs a path: pass --dataloader\.dataset_path",
    ),
    (
        "text dataset file of another format",
        lambda c, t: _text(_csv_file(t)),
        ValueError,
        r"Unsupported dataset file .*corpus\.csv': expected JSON lines .* or parquet .*Convert it",
    ),
    (
        "text dataset path missing",
        lambda c, t: _text("./no/such/folder"),
        ValueError,
        r"Dataset path './no/such/folder' does not exist\. Pass an existing file or folder",
    ),
    (
        "dataset record without text",
        lambda c, t: _record_without_text(),
        RuntimeError,
        r"Dataset record has no 'text' field \(fields: \['content'\]\)",
    ),
]


def _rows():
    for row in ERRORS:
        values, marks = (row.values, row.marks) if hasattr(row, "marks") else (row, ())
        yield pytest.param(*values[1:], id=values[0], marks=marks)


@pytest.mark.parametrize("call,exc,regex", list(_rows()))
def test_bad_input_raises_clear_error(ckpts, tmp_path, call, exc, regex):
    with pytest.raises(exc, match=regex):
        call(ckpts, tmp_path)


def test_table_is_large_enough():
    assert len(ERRORS) >= 15


# ---------------------------------------------------------------------------------------------------
# Partial checkpoints
# ---------------------------------------------------------------------------------------------------
def _plant_partial(step_dir: Path, complete: Path) -> None:
    """What a save killed mid-write leaves: some data, DCP's temporary metadata, no ``.metadata``."""
    step_dir.mkdir(parents=True, exist_ok=True)
    data = sorted(complete.glob("*.distcp"))[0].read_bytes()
    (step_dir / "__0_0.distcp").write_bytes(data[: len(data) // 3])
    (step_dir / ".metadata.tmp").write_bytes((complete / ".metadata").read_bytes()[:100])


def test_step_folder_without_metadata_is_never_loaded(ckpts, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ckpts / "pc" / "step-3", run / "step-3")
    _plant_partial(run / "step-9", run / "step-3")  # killed during its save
    (run / "step-12").mkdir()  # killed before writing anything
    (run / "step-15").write_text("")  # not a folder
    manager = _manager(_model(pc=True), tmp_path)
    try:
        assert manager._find_load_step() == 3
    finally:
        manager.close()

    # ... and the load really takes step 3: the restored state is the saved one.
    saved = _model(pc=True)
    model = _model(pc=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for _, pc in pcopt.preconditioners(model):
            pc.u.neg_()
    assert _load(model, tmp_path, exclude_from_loading=MODEL_ONLY) is True
    for (k, a), (_, b) in zip(model.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), k


def test_overwriting_a_complete_checkpoint_removes_its_marker_first(tmp_path, monkeypatch):
    import torchtitan.components.checkpointer.dcp as tt_dcp

    model = _model(pc=True)
    manager = _manager(model, tmp_path)
    try:
        _save(model, tmp_path / "run" / "step-2")
        _save(model, tmp_path / "run" / "step-4")
        target = tmp_path / "run" / "step-4"
        states = ModelWrapper([model]).state_dict()

        def killed_mid_write(state_dict, *, checkpoint_id, **kwargs):
            assert not (Path(checkpoint_id) / ".metadata").exists(), "old completion marker still present"
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
            raise RuntimeError("killed")

        monkeypatch.setattr(tt_dcp.dcp, "save", killed_mid_write)
        with pytest.raises(RuntimeError, match="killed"):
            manager.dcp_save(states, checkpoint_id=str(target), async_mode=AsyncMode.DISABLED)
        assert manager._find_load_step() == 2  # the half-overwritten step-4 is skipped
        monkeypatch.undo()

        # A save that completes leaves a complete folder with the new state.
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            manager.dcp_save(
                ModelWrapper([model]).state_dict(), checkpoint_id=str(target), async_mode=AsyncMode.DISABLED
            )
        assert manager._find_load_step() == 4
    finally:
        manager.close()
    fresh = _model(pc=True)
    assert _load(fresh, tmp_path, exclude_from_loading=MODEL_ONLY)
    for (k, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------------------------------
# Kill test: SIGKILL mid-training, restart with the same command
# ---------------------------------------------------------------------------------------------------
STEPS, EVERY = MUON_PC_STEPS, MUON_PC_EVERY
CKPT_ARGS = (
    MUON_PC_ARGS  # the command of the shared run (tests/torchtitan/conftest.py): its uninterrupted reference
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("torchtitan_reliability")


@pytest.fixture(scope="module")
def uninterrupted(muon_pc_run):
    return muon_pc_run


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_and_kill(dump: Path, kill_after_step: int, timeout: float = 240) -> tuple[str, dict]:
    """Start the run, SIGKILL torchrun and every worker once ``kill_after_step`` is logged."""
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "torchtitan_ext.train", "--module", "torchtitan_ext", "--config", "debug_muon_pc",
        "--dump_folder", str(dump), *COMMON, *CKPT_ARGS,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        args, cwd=dump.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    reached = threading.Event()
    marker = re.compile(rf"step:\s*{kill_after_step}\s+loss:")

    def read():
        for line in proc.stdout:
            lines.append(line)
            if marker.search(line):
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ok = reached.wait(timeout)
    # torchrun starts each worker in its own session: kill them all, as a node failure would.
    victims = [proc.pid, *descendants(proc.pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    reader.join(10)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in victims[1:]) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = "".join(lines)
    assert ok, f"step {kill_after_step} was not reached within {timeout}s:\n{log[-4000:]}"
    assert not any(_alive(p) for p in victims[1:]), "a worker survived SIGKILL"
    return log, parse_steps(log)


def _dcp_contents(step_dir: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=False)


def _assert_same(a, b, path="") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, set(a) ^ set(b))
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def killed_and_resumed(workdir):
    dump = workdir / "killed"
    killed_log, killed_steps = _run_and_kill(dump, kill_after_step=EVERY + 2)
    ckpt = dump / "checkpoint"
    assert (ckpt / f"step-{EVERY}" / ".metadata").is_file(), sorted(p.name for p in ckpt.iterdir())
    _plant_partial(ckpt / f"step-{STEPS}", ckpt / f"step-{EVERY}")  # as if killed while saving the last step
    snapshot = _dcp_contents(ckpt / f"step-{EVERY}", workdir)
    resumed = torchrun("debug_muon_pc", dump, *CKPT_ARGS).check()
    return killed_steps, snapshot, resumed


@pytest.mark.slow
def test_killed_run_resumes_exactly(uninterrupted, killed_and_resumed, workdir):
    killed_steps, killed_ckpt, resumed = killed_and_resumed
    ref = uninterrupted.steps
    assert sorted(ref) == list(range(1, STEPS + 1))
    # The killed run had gone two steps past its last checkpoint, identically to the uninterrupted one.
    assert max(killed_steps) >= EVERY + 2
    assert all(killed_steps[s] == ref[s] for s in killed_steps), (killed_steps, ref)

    # Nothing in the last completed checkpoint is lost: it equals the uninterrupted run's, every entry
    # (raw weights, gamma, u, v, optimizer, lr scheduler, dataloader position, step).
    _assert_same(killed_ckpt, _dcp_contents(uninterrupted.dump / "checkpoint" / f"step-{EVERY}", workdir))

    # The same command resumes from that checkpoint, skipping the partial last-step folder ...
    assert re.search(rf"Loading the checkpoint from \S*step-{EVERY}\.", resumed.log), resumed.log[-3000:]
    assert f"Training starts at step {EVERY + 1}" in resumed.log
    # ... and recomputes the lost steps and the rest bit for bit.
    assert sorted(resumed.steps) == list(range(EVERY + 1, STEPS + 1))
    for step in resumed.steps:
        assert resumed.steps[step] == ref[step], (step, resumed.steps[step], ref[step])
    final = resumed.dump / "checkpoint" / f"step-{STEPS}"
    assert (final / ".metadata").is_file()
    _assert_same(
        _dcp_contents(final, workdir),
        _dcp_contents(uninterrupted.dump / "checkpoint" / f"step-{STEPS}", workdir),
    )


# ---------------------------------------------------------------------------------------------------
# PC checkpoint -> run without PC, the way the layout error says
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pc_checkpoint_continues_without_pc_through_export(uninterrupted, workdir):
    from torchtitan_ext.export import build_model, export, load_checkpoint, load_trainer_config
    from torchtitan_ext.state_dict_adapter import PCLlamaStateDictAdapter

    ckpt = uninterrupted.dump / "checkpoint" / f"step-{STEPS}"
    pc_model = build_model(load_trainer_config("debug_muon_pc"))
    load_checkpoint(pc_model, ckpt)
    dense_cfg = load_trainer_config("debug_muon")
    dense = build_model(dense_cfg)
    with pytest.raises(RuntimeError, match=r"was written with the PC layer on 24 matrices"):
        _load(dense, workdir, folder="none", initial_load_path=str(ckpt))

    hf = export("debug_muon_pc", ckpt, workdir / "exported")
    adapter = PCLlamaStateDictAdapter(dense_cfg.model_spec.model, None)
    manager = PCCheckpointManager.Config(
        enable=True, folder="none", initial_load_path=str(hf), initial_load_in_hf=True
    ).build(
        dataloader=None, model_parts=[dense], optimizers=None, lr_schedulers=None, states={},
        sd_adapter=adapter, base_folder=str(workdir),
    )  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert manager.load()
    finally:
        manager.close()
    assert not pcopt.preconditioners(dense)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2048, (2, 64), generator=g)
    positions = torch.arange(64).expand(2, 64)
    with torch.no_grad():
        ref = pc_model(
            tokens, attention_masks=pc_model.get_attention_masks(positions=positions), positions=positions
        )
        got = dense(
            tokens, attention_masks=dense.get_attention_masks(positions=positions), positions=positions
        )
    assert (ref - got).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_run_captured_returns_output_and_kills_the_whole_tree_on_timeout(tmp_path):
    """The runner behind the test harness and the benchmark: output captured, and on timeout the job's whole
    process tree killed (a child in a session of its own, as torchrun's workers are), return code None."""
    import os
    import sys
    import time

    from torchtitan_ext.processes import run_captured

    rc, out = run_captured(
        [sys.executable, "-c", "print('hello')"], cwd=tmp_path, env=dict(os.environ), timeout=60
    )
    assert (rc, out.strip()) == (0, "hello")
    pidfile = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)"
    )
    start = time.monotonic()
    rc, out = run_captured([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ), timeout=3)
    assert rc is None and "started" in out and time.monotonic() - start < 30
    child = int(pidfile.read_text())
    time.sleep(0.5)
    try:  # killed: gone, or a zombie waiting for its parent's reaper
        with open(f"/proc/{child}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "X"
    assert state in ("Z", "X"), state
