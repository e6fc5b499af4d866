"""The shell commands in README.md and docs/*.md name things that exist, in an order that works.

Nothing is run. Every command in a ``sh``/``bash`` block or an inline code span that starts like a command
(``python``, ``torchrun``, ``pip``, an env assignment) is parsed, and:

* its Python module (``python -m X``, torchrun's ``-m X``) is a file of this repository or a known tool;
* a script (``python path.py``) and every argument that names a repository path exist in the repository;
* a torchtitan ``--config`` (with ``--module``), an export/benchmark config and a study ``--grid`` exist;
* an input (``--data``, ``--checkpoint``, ``--summarize``, a study grid's default corpus) is in the repository
  or written by an earlier command of the same page (``benchmarks.corpora``, a torchrun with
  ``--checkpoint.enable``, an ``--out`` folder);
* no page points outside the repository (``../shared``), and ``triton`` is pinned where it is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
REPO_PACKAGES = ("pcopt", "benchmarks", "torchtitan_ext", "tests")
REPO_DIRS = (*REPO_PACKAGES, "docs", ".ci")
EXTERNAL_MODULES = {"pytest", "pip", "torchtitan.train", "torch.distributed.run"}
COMMAND_START = re.compile(
    r"^(?:[A-Z_]+=\S+\s+)*(?:nohup\s+)?(?:nice\s+-n\s+\d+\s+)?(python|torchrun|pip|apt-get)\b"
)


@dataclass
class Command:
    page: str
    pos: int
    text: str
    argv: list[str]
    block: bool  # in a sh/bash block (a step to run in order), not an inline mention in the prose

    def opt(self, name: str) -> str | None:
        for i, a in enumerate(self.argv):
            if a == name and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
        return None

    def module(self) -> str | None:
        """The module run by ``python -m`` or by torchrun's ``-m`` (the first ``-m``)."""
        return self.opt("-m")


def _split(text: str) -> list[str]:
    """One shell line (continuations joined, comments dropped) -> the commands joined by && ; |."""
    text = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in text.splitlines():
        tokens = shlex.split(line, comments=True)
        cmd: list[str] = []
        for tok in tokens + ["&&"]:
            if tok in ("&&", ";", "|", "||", "&"):
                if cmd:
                    out.append(cmd)
                cmd = []
            elif tok.startswith((">", "2>", "<")) or (cmd and cmd[-1] in (">", "2>", "<")):
                continue
            else:
                cmd.append(tok)
    return [c for c in out if c]


def _strip_prefix(argv: list[str]) -> list[str]:
    i = 0
    while i < len(argv) and (re.match(r"^[A-Z_]+=", argv[i]) or argv[i] in ("nohup", "sudo")):
        i += 1
    if argv[i : i + 1] == ["nice"]:
        i += 3 if argv[i + 1 : i + 2] == ["-n"] else 1
    return argv[i:]


def commands(page: Path) -> list[Command]:
    text = page.read_text(encoding="utf-8")
    found: list[tuple[int, str, bool]] = []
    for m in re.finditer(r"```(sh|bash|shell)\n(.*?)```", text, re.S):
        found.append((m.start(), m.group(2), True))
    block_spans = [(m.start(), m.end()) for m in re.finditer(r"```.*?```", text, re.S)]
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        if any(a <= m.start() < b for a, b in block_spans):
            continue
        span = " ".join(m.group(1).split())
        if COMMAND_START.match(span):
            found.append((m.start(), span, False))
    cmds = []
    for pos, chunk, block in sorted(found):
        for argv in _split(chunk):
            argv = _strip_prefix(argv)
            if argv:
                cmds.append(Command(page.name, pos, chunk, argv, block))
    return cmds


ALL = [(p, c) for p in PAGES for c in commands(p)]


def _repo_module_exists(module: str) -> bool:
    base = REPO / Path(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _config_fn(module: str, name: str):
    """torchtitan's lookup: ``--config NAME`` in ``MODULE.config_registry``, else in ``MODULE`` itself."""
    pytest.importorskip("torchtitan", reason="torchtitan configs need the torchtitan extra")
    for candidate in (f"{module}.config_registry", module):
        try:
            mod = importlib.import_module(candidate)
        except ModuleNotFoundError:
            continue
        if callable(getattr(mod, name, None)):
            return getattr(mod, name)
    return None


def _config_exists(module: str, name: str) -> bool:
    return _config_fn(module, name) is not None


def _config(module: str, name: str):
    return _config_fn(module, name)()


def test_the_pages_have_commands():
    per_page = {p.name: sum(1 for q, _ in ALL if q == p) for p in PAGES}
    # The pages with runnable instructions; a parser that finds nothing would make every check below vacuous.
    for name in ("README.md", "results.md", "study.md", "spectra.md", "torchtitan.md", "reliability.md"):
        assert per_page[name] >= 2, per_page


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_page_points_outside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text and "/work/" not in text, page.name


@pytest.mark.parametrize("page,cmd", ALL, ids=[f"{p.name}:{' '.join(c.argv)[:60]}" for p, c in ALL])
def test_command_names_what_exists(page, cmd):
    argv = cmd.argv
    module = cmd.module()
    if argv[0] == "python" and module is None and len(argv) > 1 and argv[1].endswith(".py"):
        assert (REPO / argv[1]).is_file(), f"{page.name}: script {argv[1]} is not in the repository"
    if module is not None and argv[0] in ("python", "torchrun"):
        if module.split(".")[0] in REPO_PACKAGES:
            assert _repo_module_exists(module), f"{page.name}: module {module} is not in the repository"
        else:
            assert module in EXTERNAL_MODULES, f"{page.name}: unknown module {module}"
    for a in argv[1:]:
        value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
        path = value.split("::")[0].rstrip("/")
        if path.split("/")[0] in REPO_DIRS and "/" in path:
            assert (REPO / path).exists(), f"{page.name}: {path} is not in the repository ({' '.join(argv)})"
    if argv[0] == "pip" and "install" in argv:
        for a in argv:
            if re.match(r"^triton\b", a):
                assert "==" in a, f"{page.name}: pin triton (torchtitan 0.3.0 imports it): {' '.join(argv)}"
    if module in ("torchtitan_ext.train", "torchtitan.train") and (cmd.block or cmd.opt("--config")):
        config, tt_module = cmd.opt("--config"), cmd.opt("--module")
        assert config and tt_module, f"{page.name}: a torchtitan run needs --module and --config"
        assert _config_exists(tt_module, config), f"{page.name}: no config {config} in {tt_module}"
    if module in ("torchtitan_ext.export", "torchtitan_ext.benchmark"):
        names = [cmd.opt("--config"), cmd.opt("--baseline")]
        if "--candidates" in argv:
            i = argv.index("--candidates") + 1
            while i < len(argv) and not argv[i].startswith("-"):
                names.append(argv[i])
                i += 1
        for name in filter(None, names):
            assert _config_exists("torchtitan_ext", name), f"{page.name}: no config {name}"
    if module == "benchmarks.study" and cmd.opt("--grid"):
        from benchmarks.study import GRIDS

        assert cmd.opt("--grid") in GRIDS, f"{page.name}: no study grid {cmd.opt('--grid')}"


def _produced(cmd: Command) -> set[str]:
    """Paths (or folder prefixes ending in /) that a command writes."""
    out: set[str] = set()
    if cmd.module() == "benchmarks.corpora":
        out.add(cmd.argv[-1])
    if cmd.opt("--out"):
        out.add(cmd.opt("--out").rstrip("/") + "/")
    if cmd.module() in ("torchtitan_ext.train", "torchtitan.train") and "--checkpoint.enable" in cmd.argv:
        config = _config(cmd.opt("--module"), cmd.opt("--config"))
        steps = int(cmd.opt("--training.steps") or config.training.steps)
        interval = int(cmd.opt("--checkpoint.interval") or config.checkpoint.interval)
        dump = (cmd.opt("--dump_folder") or "outputs").rstrip("/")
        out |= {f"{dump}/checkpoint/step-{s}" for s in (*range(interval, steps + 1, interval), steps)}
    return out


def _inputs(cmd: Command) -> list[str]:
    wanted = [cmd.opt(o) for o in ("--data", "--checkpoint", "--summarize")]
    if cmd.module() == "benchmarks.study" and cmd.opt("--grid") and not cmd.opt("--data"):
        from benchmarks.study import GRIDS

        grid = GRIDS.get(cmd.opt("--grid"))
        wanted.append(grid.data if grid else None)
    return [w for w in wanted if w]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_inputs_exist_or_are_made_earlier_on_the_page(page):
    """Block commands run in page order; a command quoted in the prose may refer to any block of the page."""
    made_by_blocks = set().union(*(_produced(c) for p, c in ALL if p == page and c.block))
    made: set[str] = set()
    for p, cmd in ALL:
        if p != page:
            continue
        if not cmd.block:
            made, saved = made_by_blocks, made
        for path in _inputs(cmd):
            ok = (
                (REPO / path).exists()
                or path in made
                or any(path.startswith(m) for m in made if m.endswith("/"))
            )
            assert ok, (
                f"{page.name}: `{' '.join(cmd.argv)}` reads {path}, which is neither in the repository nor "
                f"written by an earlier command on the page (written: {sorted(made)})"
            )
        if not cmd.block:
            made = saved
        else:
            made |= _produced(cmd)


def test_the_checker_catches_an_export_before_a_checkpoint(tmp_path):
    """The docs/torchtitan.md bug of issue 21: export of a checkpoint the run before it did not write."""
    page = tmp_path / "page.md"
    run = "torchrun --standalone -m torchtitan_ext.train --module torchtitan_ext --config debug_muon_pc"
    export = "python -m torchtitan_ext.export --config debug_muon_pc --checkpoint outputs/checkpoint/step-30"
    page.write_text(f"```sh\n{run}\n{export}\n```\n")
    made: set[str] = set()
    cmds = commands(page)
    assert [c.module() for c in cmds] == ["torchtitan_ext.train", "torchtitan_ext.export"]
    made |= _produced(cmds[0])
    assert "outputs/checkpoint/step-30" not in made
    page.write_text(f"```sh\n{run} --checkpoint.enable\n{export}\n```\n")
    assert "outputs/checkpoint/step-30" in _produced(commands(page)[0])
