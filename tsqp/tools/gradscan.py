"""Static scan for `.numpy()` calls that may run on a grad-tracking tensor.

PyTorch raises ``RuntimeError: Can't call numpy() on Tensor that requires
grad`` when ``.numpy()`` is called on a tensor that is part of the autograd
graph. This module finds such calls with ``ast`` alone (no import of the
user's code) and reports the ones not provably protected by ``.detach()``,
a grad-disabling ``with`` block / decorator, or by only being reachable from
grad-disabled code within the same file.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    col: int
    function: str  # qualified name like "Runner.forward" or "<module>"
    code: str  # source segment of the call
    reason: str


@dataclass(eq=False)  # identity hashing: two same-named defs stay distinct
class _Func:
    name: str
    qualname: str
    parent: _Func | None
    mode: str | None  # "off" / "on" when decorated to disable / enable grad


@dataclass
class _Site:
    func: _Func | None  # enclosing function, None at module level
    no_grad: bool  # inside a grad-disabling `with` within that function


def _final_name(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        return expr.attr
    return None


def _is_false(call: ast.Call) -> bool:
    """True if the grad-mode argument (first positional or `mode=`) is literal False."""
    args = call.args[:1] + [k.value for k in call.keywords if k.arg == "mode"]
    return bool(args) and isinstance(args[0], ast.Constant) and args[0].value is False


def _grad_mode(expr: ast.expr) -> str | None:
    """'off' if `expr` disables grad, 'on' if it (re-)enables it, else None."""
    call = expr if isinstance(expr, ast.Call) else None
    name = _final_name(call.func if call else expr)
    if name == "enable_grad":
        return "on"
    if call is None:  # bare decorator form: `@torch.no_grad`
        return "off" if name in ("no_grad", "inference_mode") else None
    if name == "no_grad" or (name == "inference_mode" and not _is_false(call)):
        return "off"
    if name == "set_grad_enabled":
        # A non-literal flag may be True at runtime, so treat it as enabling.
        return "off" if _is_false(call) else "on"
    return None  # includes inference_mode(False), which is a no-op


def _is_detached(call: ast.Call) -> bool:
    """True if the receiver chain of `<recv>.numpy()` goes through `.detach()`."""
    node = call.func.value  # type: ignore[attr-defined]
    while isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Call):
            if _final_name(node.func) in ("detach", "detach_"):
                return True
            node = node.func
        else:
            node = node.value
    return False


def _is_numpy_call(node: ast.Call) -> bool:
    return isinstance(node.func, ast.Attribute) and node.func.attr == "numpy" and not node.args


def _forced(node: ast.Call) -> bool:
    # `t.numpy(force=True)` detaches internally, so it never raises.
    return any(k.arg == "force" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)


class _Collector(ast.NodeVisitor):
    """One pass: collect defs, call sites by callee name, and `.numpy()` calls."""

    def __init__(self) -> None:
        self.funcs: list[_Func] = []
        self.sites: dict[str, list[_Site]] = {}
        self.numpy_calls: list[tuple[ast.Call, _Site]] = []
        self._func: _Func | None = None
        self._qual: list[str] = []
        self._no_grad = False

    def _visit_def(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        # Decorators, defaults and annotations evaluate in the enclosing scope.
        for child in (*node.decorator_list, node.args, node.returns):
            if child is not None:
                self.visit(child)
        modes = [m for m in map(_grad_mode, node.decorator_list) if m]
        qual = ".".join([*self._qual, node.name])
        func = _Func(node.name, qual, self._func, modes[0] if modes else None)
        self.funcs.append(func)
        saved = self._func, self._qual, self._no_grad
        # The body runs when called, not inside any enclosing `with` block.
        self._func, self._qual, self._no_grad = func, [*self._qual, node.name], False
        for stmt in node.body:
            self.visit(stmt)
        self._func, self._qual, self._no_grad = saved

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_def

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for child in (*node.decorator_list, *node.bases, *node.keywords):
            self.visit(child)
        self._qual.append(node.name)
        for stmt in node.body:
            self.visit(stmt)
        self._qual.pop()

    def _visit_with(self, node: ast.With | ast.AsyncWith) -> None:
        for item in node.items:
            self.visit(item)
        saved = self._no_grad
        for item in node.items:  # later items win, e.g. `no_grad(), enable_grad()`
            mode = _grad_mode(item.context_expr)
            if mode:
                self._no_grad = mode == "off"
        for stmt in node.body:
            self.visit(stmt)
        self._no_grad = saved

    visit_With = visit_AsyncWith = _visit_with

    def visit_Call(self, node: ast.Call) -> None:
        site = _Site(self._func, self._no_grad)
        name = _final_name(node.func)
        if name is not None:
            self.sites.setdefault(name, []).append(site)
        if _is_numpy_call(node):
            self.numpy_calls.append((node, site))
        self.generic_visit(node)


def _safe_functions(col: _Collector) -> set[_Func]:
    """Functions whose bodies always run with grad disabled.

    Greatest fixpoint first (so recursion under no_grad stays safe), then a
    least fixpoint grounded in real entries (decorator or no_grad call site)
    so that closed call cycles with no safe entry are not marked safe.
    """

    def ok(site: _Site, safe: set[_Func]) -> bool:
        return site.no_grad or site.func in safe

    def step(f: _Func, safe: set[_Func], all_sites: bool) -> bool:
        if f.mode is not None:
            return f.mode == "off"
        if f.parent in safe:
            return True
        fs = col.sites.get(f.name, [])
        return bool(fs) and (all if all_sites else any)(ok(s, safe) for s in fs)

    upper = set(col.funcs)
    while (new := {f for f in upper if step(f, upper, True)}) != upper:
        upper = new
    lower: set[_Func] = set()
    while (new := {f for f in upper if step(f, lower, False)}) != lower:
        lower = new
    return lower


def _reason(site: _Site, col: _Collector) -> str:
    if site.func is None:
        return "module-level call not under no_grad/inference_mode and not detached"
    if col.sites.get(site.func.name):
        return "not detached; function is reachable from a grad-enabled call site"
    return "not under no_grad/inference_mode and not detached"


def scan_source(source: str, path: str = "<string>") -> list[Finding]:
    """Return findings for risky `.numpy()` calls in `source`, sorted by line."""
    col = _Collector()
    col.visit(ast.parse(source, filename=path))
    safe = _safe_functions(col)
    findings = [
        Finding(
            path, node.lineno, node.col_offset, site.func.qualname if site.func else "<module>", ast.get_source_segment(source, node) or "", _reason(site, col)
        )
        for node, site in col.numpy_calls
        if not (_is_detached(node) or _forced(node) or site.no_grad or site.func in safe)
    ]
    return sorted(findings, key=lambda f: (f.line, f.col))


def scan_file(path: str | Path) -> list[Finding]:
    """Scan a file on disk; FileNotFoundError / SyntaxError propagate to the caller."""
    path = Path(path)
    return scan_source(path.read_text(encoding="utf-8"), str(path))
