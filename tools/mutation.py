"""Mutation testing of pcopt's core maths: one-token mutants of a module, each run against its fast tests.

A small AST mutator (no third-party tool): every mutant changes exactly one token of the module's source,

- a binary operator: ``+``/``-``, ``*``/``/``, ``//`` -> ``/``, ``**`` -> ``*``, ``|``/``&`` (also as ``+=`` ...);
- a comparison: ``<``/``<=``, ``>``/``>=``, ``==``/``!=``, ``is``/``is not``, ``in``/``not in``;
- a boolean operator ``and``/``or``; ``True``/``False``;
- a number: an int ``c -> c + 1``, a float not 0 or 1 ``c -> 1.01 c``.

Annotations, ``raise`` statements, ``warnings.warn`` calls, f-strings and ``__all__`` are not mutated (they are
messages and types, not maths). Each mutant is written over the module in a private copy of the repository
(``git archive HEAD``, plus the untracked test files named on the command line; the checkout itself is never
touched) and the tests run there with ``pytest -x``. The copy's process imports torch and pytest once and forks
one child per mutant, so a mutant costs its tests, not an interpreter start. A mutant is *killed* when the tests
fail (or the module no longer imports), *timeout* when they run past ``--timeout-factor`` times the clean run,
else it *survived*. Survivors judged equivalent (no input can tell them apart) are listed in
:data:`EQUIVALENT` with the reason; the kill rate is over the others.

    OMP_NUM_THREADS=1 python -m tools.mutation --module pcopt/polynomials.py \\
        --tests tests/unit/test_polynomials.py [--max-mutants N] [--out DIR]
    OMP_NUM_THREADS=1 python -m tools.mutation --core      # every module of CORE, with its tests
    OMP_NUM_THREADS=1 python -m tools.mutation --smoke     # a planted mutant and two more, polynomials.py
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Operator flips, by AST class: (token, replacement token).
_BINOPS = {
    ast.Add: ("+", "-"),
    ast.Sub: ("-", "+"),
    ast.Mult: ("*", "/"),
    ast.Div: ("/", "*"),
    ast.FloorDiv: ("//", "/"),
    ast.Pow: ("**", "*"),
    ast.BitOr: ("|", "&"),
    ast.BitAnd: ("&", "|"),
}
_CMPOPS = {
    ast.Lt: ("<", "<="),
    ast.LtE: ("<=", "<"),
    ast.Gt: (">", ">="),
    ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="),
    ast.NotEq: ("!=", "=="),
    ast.Is: ("is", "is not"),
    ast.IsNot: ("is not", "is"),
    ast.In: ("in", "not in"),
    ast.NotIn: ("not in", "in"),
}
_BOOLOPS = {ast.And: ("and", "or"), ast.Or: ("or", "and")}

# The core modules, their fast unit tests, the functions mutated (regex on the qualified name; None: all)
# and the cap on mutants (a deterministic sample when there are more).
CORE: list[dict] = [
    {
        "module": "pcopt/polynomials.py",
        "tests": ["tests/unit/test_polynomials.py"],
    },
    {
        "module": "pcopt/power_iteration.py",
        "tests": ["tests/unit/test_parametrization.py", "tests/unit/test_power_iteration.py"],
        # The DTensor paths (_local_view's sharded branch, shard_indices) run only in tests/distributed.
        "functions": r"normalize|init_singular_vectors|sigma_estimate|_half_step|invalid|_heal|power_iteration_",
    },
    {
        "module": "pcopt/kernel.py",
        "tests": ["tests/unit/test_strategy.py", "tests/unit/test_accumulation.py", "tests/unit/test_kernel.py"],
        # The once-per-step map (W -> W_eff) and its pull-back (dL/dW_eff -> dL/dW, dL/dgamma).
        "functions": r"_oriented|chunks|_stack|_vectors|_partial_sums|_reduced|_gammas|_effective|"
        r"_write_chunk|write_|pull_back_|_pull_back_chunk|_raw_gradients|_accumulate",
    },
    {"module": "pcopt/optim/_newton_schulz.py", "tests": ["tests/unit/test_newton_schulz.py"]},
    {
        "module": "pcopt/optim/_muon.py",
        "tests": ["tests/unit/test_muon.py"],
        # The step's dispatch; option validation (_validate_options, __init__) is covered by the error tables.
        "functions": r"Muon\.step",
    },
    {
        "module": "pcopt/optim/_muon_step.py",
        "tests": ["tests/unit/test_muon.py"],
        # The update maths.
        "functions": r"adjust_lr|_momentum|_apply_updates|_matrices_per_call|_newton_schulz_chunked|"
        r"_orthogonalize|muon_impl",
    },
    {
        "module": "pcopt/spectral_clip.py",
        "tests": ["tests/unit/test_spectral_clip.py"],
        "functions": r"vector_clip_scale|_vector_clip|auto_clip_steps|_matrix_clip|spectral_clip|spectral_clip_flops",
    },
]
for _c in CORE:
    _c.setdefault("functions", None)
    _c.setdefault("max_mutants", None)

# Survivors that no input can tell from the original, keyed by module and "original line => mutated line"
# (stripped source lines, so the key survives unrelated edits that move line numbers).
_SAME_BITS = "only chooses stacked or one-matrix-at-a-time Newton-Schulz, which give the same bits per matrix"
EQUIVALENT: dict[str, dict[str, str]] = {
    "pcopt/polynomials.py": {
        "if abs(total - 1.0) > 1e-6: => if abs(total - 1.0) >= 1e-6:": "total - 1.0 is exact near 1 (a multiple of "
        "2^-53) and 1e-6 is not one, so the difference never equals the threshold",
        "tall = X.shape[-2] >= X.shape[-1] => tall = X.shape[-2] > X.shape[-1]": "differs only for square X, "
        "where X q(X^T X) = q(X X^T) X and both Gram matrices have the same size",
        "k = gram.shape[-1] => k = gram.shape[-2]": "a Gram matrix is square",
        "if gram.ndim > 2:  # any batch shape, flattened into the one batch dim baddbmm takes => "
        "if gram.ndim >= 2:  # any batch shape, flattened into the one batch dim baddbmm takes": "a 2-D Gram "
        "matrix then runs the batched branch with an empty batch shape: the same products",
    },
    "pcopt/power_iteration.py": {
        "def init_singular_vectors(shape: Sequence[int], seed: int = 0) -> tuple[Tensor, Tensor]: => "
        "def init_singular_vectors(shape: Sequence[int], seed: int = 1) -> tuple[Tensor, Tensor]:": "another "
        "random start of the power iteration; it converges to the same singular pair (u, v are checkpointed)",
        "return (u.unsqueeze(-2) @ W @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1) => "
        "return (u.unsqueeze(-2) @ W @ v.unsqueeze(-1)).squeeze(-2).squeeze(-1)": "the product ends in (1, 1): "
        "either order drops exactly those two dims",
        "full = tuple(local.shape) == tuple(shape) => full = tuple(local.shape) != tuple(shape)": "a whole "
        "tensor then takes the scatter path with full slices: the same values, one extra copy",
    },
    "pcopt/optim/_newton_schulz.py": {
        "stack: bool = True, => stack: bool = False,": _SAME_BITS,
        "if not stack and G.ndim > 2 and math.prod(G.shape[:-2]) > 1: => "
        "if not stack and G.ndim > 2 and math.prod(G.shape[:-3]) > 1:": _SAME_BITS,
        "flat = G.reshape(-1, *G.shape[-2:]) => flat = G.reshape(-1, *G.shape[-3:])": _SAME_BITS,
    },
    "pcopt/optim/_muon.py": {
        "self._ns_dtype_checked = True => self._ns_dtype_checked = False": "only the attribute's presence is read",
        "per_call = _matrices_per_call(batch.shape[1:], foreach, batch.device) => "
        "per_call = _matrices_per_call(batch.shape[2:], foreach, batch.device)": _SAME_BITS,
        "if per_call >= batch.shape[0]: => if per_call > batch.shape[0]:": _SAME_BITS,
        "return ns(batch, stack=True) => return ns(batch, stack=False)": _SAME_BITS,
        "for chunk in [sharded] if foreach is not False else [[i] for i in sharded]: => "
        "for chunk in [sharded] if foreach is False else [[i] for i in sharded]:": "DTensors: one collective pair "
        "for all or one per matrix, the same values",
        "if foreach is not False: => if foreach is False:": "the per-chunk and the whole-list loops apply the same "
        "momentum, Newton-Schulz and update to every matrix (same bits); only cache use differs",
    },
    "pcopt/spectral_clip.py": {
        "transposed = W.shape[-2] > W.shape[-1] => transposed = W.shape[-2] >= W.shape[-1]": "differs only for "
        "square X, where (I + X X^T/c^2)^(-1/2) X = X (I + X^T X/c^2)^(-1/2) with same-sized Gram matrices",
        "a = (1 + bound / (c * c)).unsqueeze(-1).unsqueeze(-1) => "
        "a = (1 + bound / (c * c)).unsqueeze(-1).unsqueeze(-2)": "both append the same two unit dims",
    },
}

# The functional step moved from _muon.py to _muon_step.py; its equivalent survivors are the same lines.
EQUIVALENT["pcopt/optim/_muon_step.py"] = EQUIVALENT["pcopt/optim/_muon.py"]

@dataclass(frozen=True)
class Mutant:
    index: int
    kind: str  # binop, augassign, compare, boolop, number, bool
    line: int  # 1-based, in the original source
    col: int  # character columns of the replaced span
    end_line: int
    end_col: int
    original: str  # the replaced token(s)
    replacement: str
    function: str  # qualified name of the enclosing function, "<module>" at top level

    def apply(self, source: str) -> str:
        lines = source.splitlines(keepends=True)
        head = "".join(lines[: self.line - 1]) + lines[self.line - 1][: self.col]
        tail = lines[self.end_line - 1][self.end_col :] + "".join(lines[self.end_line :])
        return head + self.replacement + tail

    def lines(self, source: str) -> tuple[str, str]:
        """The original and mutated source line (stripped), the mutant's key in :data:`EQUIVALENT`."""
        before = source.splitlines()[self.line - 1].strip()
        after = self.apply(source).splitlines()[self.line - 1].strip()
        return before, after


def _char_col(lines: list[str], lineno: int, byte_col: int) -> int:
    """AST columns count UTF-8 bytes; tokenize and string slicing count characters."""
    return len(lines[lineno - 1].encode()[:byte_col].decode(errors="ignore"))


class _Collector(ast.NodeVisitor):
    def __init__(self, source: str) -> None:
        self.source = source
        self.lines = source.splitlines(keepends=True)
        toks = tokenize.generate_tokens(io.StringIO(source).readline)
        skip = {tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT}
        self.tokens = [t for t in toks if t.type not in skip and t.string not in "()"]
        self.found: list[tuple] = []
        self.scope: list[str] = []

    # -- positions --------------------------------------------------------------------------------------
    def _start(self, node: ast.AST) -> tuple[int, int]:
        return node.lineno, _char_col(self.lines, node.lineno, node.col_offset)

    def _end(self, node: ast.AST) -> tuple[int, int]:
        return node.end_lineno, _char_col(self.lines, node.end_lineno, node.end_col_offset)

    def _between(
        self, left: ast.AST, right: ast.AST, text: str
    ) -> None | tuple[tuple[int, int], tuple[int, int]]:
        """The span of the operator tokens between two operands, if they spell ``text``."""
        lo, hi = self._end(left), self._start(right)
        inner = [t for t in self.tokens if lo <= t.start and t.end <= hi]
        if not inner or " ".join(t.string for t in inner) != text:
            return None
        return inner[0].start, inner[-1].end

    def _add(self, kind: str, span, original: str, replacement: str) -> None:
        if span is not None:
            (l0, c0), (l1, c1) = span
            fn = ".".join(self.scope) or "<module>"
            self.found.append((kind, l0, c0, l1, c1, original, replacement, fn))

    # -- scopes and exclusions --------------------------------------------------------------------------
    def _scoped(self, node) -> None:
        self.scope.append(node.name)
        for d in node.decorator_list:
            self.visit(d)
        if not isinstance(node, ast.ClassDef):  # defaults, not annotations
            for d in [*node.args.defaults, *node.args.kw_defaults]:
                if d is not None:
                    self.visit(d)
        for stmt in node.body:
            self.visit(stmt)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Raise(self, node) -> None:  # error messages
        pass

    def visit_JoinedStr(self, node) -> None:  # f-strings
        pass

    def visit_AnnAssign(self, node) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_Assign(self, node) -> None:
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        self.generic_visit(node)

    def visit_Call(self, node) -> None:
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "warn" and getattr(f.value, "id", None) == "warnings":
            return
        self.generic_visit(node)

    # -- mutation sites ---------------------------------------------------------------------------------
    def visit_BinOp(self, node) -> None:
        if type(node.op) in _BINOPS:
            tok, rep = _BINOPS[type(node.op)]
            self._add("binop", self._between(node.left, node.right, tok), tok, rep)
        self.generic_visit(node)

    def visit_AugAssign(self, node) -> None:
        if type(node.op) in _BINOPS:
            tok, rep = _BINOPS[type(node.op)]
            self._add("augassign", self._between(node.target, node.value, tok + "="), tok + "=", rep + "=")
        self.generic_visit(node)

    def visit_Compare(self, node) -> None:
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            tok, rep = _CMPOPS[type(op)]
            self._add("compare", self._between(left, right, tok), tok, rep)
            left = right
        self.generic_visit(node)

    def visit_BoolOp(self, node) -> None:
        tok, rep = _BOOLOPS[type(node.op)]
        for left, right in zip(node.values, node.values[1:]):
            self._add("boolop", self._between(left, right, tok), tok, rep)
        self.generic_visit(node)

    def visit_Constant(self, node) -> None:
        v = node.value
        span = (self._start(node), self._end(node))
        if isinstance(v, bool):
            self._add("bool", span, repr(v), repr(not v))
        elif isinstance(v, int):
            self._add("number", span, self.source_of(span), repr(v + 1))
        elif isinstance(v, float) and math_finite(v) and v not in (0.0, 1.0):
            self._add("number", span, self.source_of(span), repr(float(f"{v * 1.01:.12g}")))

    def source_of(self, span) -> str:
        (l0, c0), (l1, c1) = span
        if l0 != l1:
            return ""
        return self.lines[l0 - 1][c0:c1]


def math_finite(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))


def generate(source: str, functions: str | None = None) -> list[Mutant]:
    """Every one-token mutant of ``source`` (optionally only inside functions whose name matches the regex)."""
    c = _Collector(source)
    c.visit(ast.parse(source))
    pattern = re.compile(rf"(?:{functions})$") if functions else None
    out: list[Mutant] = []
    for kind, l0, c0, l1, c1, orig, rep, fn in sorted(c.found, key=lambda f: (f[1], f[2], f[0])):
        if pattern is not None and not (pattern.match(fn) or pattern.match(fn.split(".")[0])):
            continue
        m = Mutant(len(out), kind, l0, c0, l1, c1, orig, rep, fn)
        try:
            ast.parse(m.apply(source))
        except SyntaxError:
            continue
        out.append(m)
    return out


def sample(mutants: list[Mutant], cap: int | None, seed: int) -> list[Mutant]:
    """A deterministic sample of at most ``cap`` mutants, in source order."""
    if cap is None or len(mutants) <= cap:
        return list(mutants)
    return sorted(random.Random(seed).sample(mutants, cap), key=lambda m: m.index)


# ------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------
def _test_files(tests: list[str]) -> list[str]:
    return sorted({t.split("::")[0] for t in tests})


def _existing(tests: list[str]) -> list[str]:
    """``tests`` without the files that do not exist."""
    return [t for t in tests if (ROOT / t.split("::")[0]).is_file()]


def head_source(module: str) -> str:
    """The module as committed (what the copy holds), not the checkout's possibly edited file."""
    return subprocess.run(
        ["git", "show", f"HEAD:{module}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def make_tree(dest: Path, tests: list[str]) -> None:
    """``git archive HEAD`` of the checkout into ``dest``, plus the untracked test files among ``tests``."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    # This script too: tests that spawn processes re-import ``__main__`` (this module) by name in the copy.
    (dest / "tools" / "mutation.py").write_text(Path(__file__).read_text())
    for t in _test_files(tests):
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", t], cwd=ROOT, capture_output=True)
        if tracked.returncode != 0 and (ROOT / t).is_file():
            (dest / t).write_text((ROOT / t).read_text())


def _warm_imports() -> None:
    """Import the heavy dependencies once, before forking (never pcopt: each child imports the mutated copy)."""
    import einops  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401


def _child(tree: Path, tests: list[str], log: Path) -> int:
    os.setpgid(0, 0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(tree)
    sys.path[:] = [str(tree)] + [p for p in sys.path if p not in ("", str(ROOT))]
    import pytest

    code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests]))
    mod = sys.modules.get("pcopt")
    if mod is None or not str(mod.__file__).startswith(str(tree)):
        print(f"pcopt was imported from {getattr(mod, '__file__', None)}, not the copy {tree}")
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def run_tests(tree: Path, tests: list[str], timeout: float, log: Path) -> tuple[str, float, int]:
    """Run ``tests`` in ``tree`` in a forked child: (status, seconds, exit code)."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            code = _child(tree, tests, log)
        finally:
            os._exit(code)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        elapsed = time.perf_counter() - t0
        if done:
            code = os.waitstatus_to_exitcode(status)
            return ("survived" if code == 0 else "killed"), elapsed, code
        if elapsed > timeout:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", elapsed, -9
        time.sleep(0.02)


def mutate_module(
    module: str,
    tests: list[str],
    mutants: list[Mutant],
    *,
    timeout_factor: float = 3.0,
    log_dir: Path | None = None,
    verbose: bool = True,
) -> dict:
    """Run every mutant of ``module`` against ``tests`` in a private copy; the results as a JSON-able dict."""
    if "pcopt" in sys.modules:
        raise RuntimeError("run mutation testing in its own process: pcopt is already imported here")
    sys.dont_write_bytecode = True  # a mutant may keep the size and mtime second of the source
    _warm_imports()
    equivalent = EQUIVALENT.get(module, {})
    with tempfile.TemporaryDirectory(prefix="pcopt_mut_") as tmp:
        tree = Path(tmp) / "repo"
        tree.mkdir()
        make_tree(tree, tests)
        logs = Path(log_dir or tmp)
        logs.mkdir(parents=True, exist_ok=True)
        target = tree / module
        source = target.read_text()
        if mutants and source != head_source(module):
            raise RuntimeError(f"{module} changed at HEAD while the mutants were generated; run again")
        status, clean_s, code = run_tests(tree, tests, 600.0, logs / "clean.log")
        if status != "survived":
            raise RuntimeError(
                f"the tests fail on the unmutated copy (exit {code}): see {logs / 'clean.log'}"
            )
        timeout = max(timeout_factor * clean_s, clean_s + 5.0)
        if verbose:
            print(
                f"{module}: clean run {clean_s:.1f} s, timeout {timeout:.1f} s, {len(mutants)} mutants",
                flush=True,
            )
        results = []
        try:
            for m in mutants:
                target.write_text(m.apply(source))
                st, secs, code = run_tests(tree, tests, timeout, logs / f"mutant_{m.index}.log")
                before, after = m.lines(source)
                reason = equivalent.get(f"{before} => {after}")
                results.append(
                    {**asdict(m), "status": st, "seconds": round(secs, 2), "exit_code": code,
                     "before": before, "after": after, "equivalent": reason}
                )  # fmt: skip
                if verbose:
                    tag = st if st != "survived" or reason is None else "equivalent"
                    print(f"  {tag:10s} {secs:5.1f}s L{m.line:<4d} {after}", flush=True)
        finally:
            target.write_text(source)
    return summarize(module, tests, results, clean_s, timeout)


def summarize(module: str, tests: list[str], results: list[dict], clean_s: float, timeout: float) -> dict:
    killed = sum(r["status"] in ("killed", "timeout") for r in results)
    survivors = [r for r in results if r["status"] == "survived"]
    equivalent = sum(r["equivalent"] is not None for r in survivors)
    judged = len(results) - equivalent
    return {
        "module": module,
        "tests": tests,
        "clean_seconds": round(clean_s, 2),
        "timeout_seconds": round(timeout, 2),
        "mutants": len(results),
        "killed": killed,
        "timeouts": sum(r["status"] == "timeout" for r in results),
        "survived": len(survivors),
        "equivalent": equivalent,
        "kill_rate_non_equivalent": killed / judged if judged else 1.0,
        "survivors": [
            {k: r[k] for k in ("index", "line", "kind", "function", "before", "after", "equivalent")}
            for r in survivors
        ],
        "results": results,
    }


def _report(s: dict) -> str:
    return (
        f"{s['module']}: {s['mutants']} mutants, {s['killed']} killed ({s['timeouts']} by timeout), "
        f"{s['survived']} survived ({s['equivalent']} equivalent): "
        f"kill rate of non-equivalent {100 * s['kill_rate_non_equivalent']:.1f}%"
    )


def _write(out: Path, summary: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / (summary["module"].replace("/", "_").removesuffix(".py") + ".json")
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return path


SMOKE_PLANTED = "acc = acc * x2 - a"  # evaluate_scalar's Horner step with its + flipped


def smoke(out: Path, seed: int) -> dict:
    """The planted mutant of :data:`SMOKE_PLANTED` and two sampled ones of polynomials.py, with its tests."""
    module, tests = "pcopt/polynomials.py", ["tests/unit/test_polynomials.py"]
    source = head_source(module)
    mutants = generate(source)
    planted = next(m for m in mutants if m.lines(source)[1] == SMOKE_PLANTED)
    others = sample([m for m in mutants if m is not planted], 2, seed)
    summary = mutate_module(module, tests, sorted([planted, *others], key=lambda m: m.index))
    summary["planted"] = planted.index
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--module", help="module to mutate, relative to the repository root")
    p.add_argument("--tests", nargs="+", help="pytest paths / node ids that should kill the mutants")
    p.add_argument("--functions", help="regex: mutate only inside functions whose qualified name matches")
    p.add_argument("--max-mutants", type=int, help="cap: a deterministic sample (--seed) when there are more")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-factor", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "mutation")
    p.add_argument("--core", action="store_true", help="every module of CORE with its tests and cap")
    p.add_argument("--only", nargs="+", help="with --core: only the modules whose path contains one of these")
    p.add_argument("--smoke", action="store_true", help="a planted mutant and two more of polynomials.py")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    p.add_argument(
        "--survivors-only",
        action="store_true",
        help="rerun only the survivors of the previous JSON in --out (same mutants) and merge: killed stays killed",
    )
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    if args.smoke:
        s = smoke(args.out, args.seed)
        print(_report(s), f"-> {_write(args.out, s)}")
        return 0
    if args.core:
        jobs = [
            {**c, "tests": _existing(c["tests"])}
            for c in CORE
            if args.only is None or any(o in c["module"] for o in args.only)
        ]
    elif args.module and args.tests:
        jobs = [{"module": args.module, "tests": args.tests, "functions": args.functions,
                 "max_mutants": args.max_mutants}]  # fmt: skip
    else:
        p.error("give --module and --tests, or --core, or --smoke")
    cap_override = args.max_mutants if args.core else None
    for job in jobs:
        source = head_source(job["module"])
        all_mutants = generate(source, job["functions"])
        cap = cap_override if cap_override is not None else job["max_mutants"]
        chosen = sample(all_mutants, cap, args.seed)
        if args.list:
            for m in chosen:
                print(f"{job['module']}:{m.line} [{m.function}] {m.lines(source)[1]}")
            continue
        previous = _previous(args.out, job["module"], chosen, source) if args.survivors_only else None
        todo = (
            chosen if previous is None else [m for m in chosen if previous[m.index]["status"] == "survived"]
        )
        s = mutate_module(
            job["module"], job["tests"], todo, timeout_factor=args.timeout_factor,
            log_dir=args.out / "logs" / Path(job["module"]).stem,
        )  # fmt: skip
        if previous is not None:
            again = {r["index"]: r for r in s["results"]}
            merged = [again.get(m.index, previous[m.index]) for m in chosen]
            s = summarize(job["module"], job["tests"], merged, s["clean_seconds"], s["timeout_seconds"])
        s["generated"] = len(all_mutants)
        s["sampled"] = len(chosen)
        s["seed"] = args.seed
        print(_report(s) + f" [{len(chosen)} of {len(all_mutants)} generated] -> {_write(args.out, s)}")
    return 0


def _previous(out: Path, module: str, chosen: list[Mutant], source: str) -> dict[int, dict] | None:
    """The previous run's results by mutant index, if it ran exactly these mutants; else None (run all)."""
    path = out / (module.replace("/", "_").removesuffix(".py") + ".json")
    if not path.is_file():
        return None
    results = {r["index"]: r for r in json.loads(path.read_text())["results"]}
    same = len(results) == len(chosen) and all(
        m.index in results and (results[m.index]["before"], results[m.index]["after"]) == m.lines(source)
        for m in chosen
    )
    if not same:
        return None
    for r in results.values():  # re-judge with the current table
        if r["status"] == "survived":
            r["equivalent"] = EQUIVALENT.get(module, {}).get(f"{r['before']} => {r['after']}")
    return results


if __name__ == "__main__":
    sys.exit(main())
