"""Tests for tsqp.tools.gradscan: static detection of `.numpy()` on grad tensors."""

import textwrap

import pytest

from tsqp.tools.gradscan import Finding, scan_file, scan_source


def scan(src: str) -> list[Finding]:
    return scan_source(textwrap.dedent(src), "model.py")


def lines(src: str) -> list[int]:
    return [f.line for f in scan(src)]


def test_unprotected_call_in_plain_function_is_found_with_line():
    findings = scan("""\
        import torch

        def run(x):
            hidden = x * 2
            return hidden.cpu().numpy()
        """)
    assert len(findings) == 1
    f = findings[0]
    assert (f.path, f.line, f.function) == ("model.py", 5, "run")
    assert f.code == "hidden.cpu().numpy()"
    assert "no_grad" in f.reason


@pytest.mark.parametrize(
    "expr",
    [
        "x.detach().numpy()",
        "x.detach().cpu().contiguous().numpy()",
        "x[0].detach().cpu().numpy()",
        "x.numpy(force=True)",
    ],
)
def test_detached_or_forced_is_safe(expr):
    assert lines(f"def f(x):\n    return {expr}\n") == []


def test_cpu_without_detach_is_flagged():
    assert lines("def f(x):\n    return x.cpu().numpy()\n") == [2]


@pytest.mark.parametrize(
    "ctx",
    [
        "torch.no_grad()",
        "no_grad()",
        "torch.inference_mode()",
        "inference_mode()",
        "torch.autograd.no_grad()",
        "torch.set_grad_enabled(False)",
        "torch.set_grad_enabled(mode=False)",
        "open('f'), torch.no_grad()",
    ],
)
def test_grad_disabling_with_block_is_safe(ctx):
    src = f"def f(x):\n    with {ctx}:\n        return x.numpy()\n"
    assert lines(src) == []


@pytest.mark.parametrize(
    "ctx",
    [
        "torch.set_grad_enabled(True)",
        "torch.set_grad_enabled(flag)",
        "torch.inference_mode(False)",
        "open('f')",
    ],
)
def test_non_disabling_with_block_is_flagged(ctx):
    src = f"def f(x, flag):\n    with {ctx}:\n        return x.numpy()\n"
    assert lines(src) == [3]


def test_enable_grad_inside_no_grad_is_flagged():
    assert lines("""\
        with torch.no_grad():
            with torch.enable_grad():
                y = x.numpy()
            z = x.numpy()
        """) == [3]


def test_call_after_with_block_is_flagged():
    assert lines("""\
        def f(x):
            with torch.no_grad():
                a = x.numpy()
            return x.numpy()
        """) == [4]


@pytest.mark.parametrize(
    "deco",
    [
        "torch.no_grad()",
        "torch.no_grad",
        "no_grad()",
        "torch.inference_mode()",
        "inference_mode",
        "torch.set_grad_enabled(False)",
    ],
)
def test_grad_disabling_decorator_is_safe(deco):
    assert lines(f"@{deco}\ndef f(x):\n    return x.numpy()\n") == []


def test_unrelated_decorator_is_flagged():
    assert lines("@functools.cache\ndef f(x):\n    return x.numpy()\n") == [3]


RUNNER = """\
    import torch

    class Runner:
        def batch_linear(self, h):
            return h.cpu().numpy()

        @torch.no_grad()
        def forward(self, x):
            return self.batch_linear(x)
    """


def test_helper_called_only_from_no_grad_method_is_safe():
    assert lines(RUNNER) == []


def test_helper_becomes_flagged_with_extra_grad_enabled_caller():
    src = (
        RUNNER
        + """\

        def train_step(self, x):
            return self.batch_linear(x)
    """
    )
    findings = scan(src)
    assert [(f.line, f.function) for f in findings] == [(5, "Runner.batch_linear")]
    assert "reachable" in findings[0].reason


def test_module_level_call_to_helper_makes_it_unsafe():
    assert lines(RUNNER + "\n    Runner().batch_linear(torch.ones(1))\n") == [5]


def test_transitive_reachability_through_plain_call():
    assert (
        lines("""\
        def leaf(t):
            return t.numpy()

        def middle(t):
            return leaf(t)

        def outer(t):
            with torch.no_grad():
                return middle(t)
        """)
        == []
    )


def test_helper_without_callers_is_flagged():
    assert lines("def helper(t):\n    return t.numpy()\n") == [2]


def test_cycle_without_safe_entry_stays_unsafe():
    assert lines("""\
        def a(t):
            return b(t.numpy())

        def b(t):
            return a(t)
        """) == [2]


def test_recursion_with_safe_entry_is_safe():
    assert (
        lines("""\
        def walk(t, n):
            if n:
                return walk(t, n - 1)
            return t.numpy()

        with torch.no_grad():
            walk(x, 3)
        """)
        == []
    )


def test_nested_function_inside_decorated_function_is_safe():
    assert (
        lines("""\
        @torch.no_grad()
        def outer(x):
            def inner(y):
                return y.numpy()
            return inner
        """)
        == []
    )


def test_enable_grad_decorator_overrides_safe_context():
    assert lines("""\
        @torch.enable_grad()
        def g(t):
            return t.numpy()

        with torch.no_grad():
            g(x)
        """) == [3]


def test_def_inside_with_block_is_not_covered_by_it():
    # The body runs at call time, after the `with` has exited.
    assert lines("""\
        with torch.no_grad():
            def f(t):
                return t.numpy()
        f(x)
        """) == [3]


def test_module_level_call_is_flagged_and_sorted():
    findings = scan("""\
        def f(t):
            return t.numpy()

        y = x.numpy()
        with torch.no_grad():
            z = x.numpy()
        """)
    assert [(f.line, f.function) for f in findings] == [(2, "f"), (4, "<module>")]
    assert findings[1].reason.startswith("module-level")


def test_numpy_with_positional_args_is_ignored():
    # e.g. a method named numpy taking data, not Tensor.numpy()
    assert lines("def f(x):\n    return conv.numpy(x)\n") == []


def test_scan_file(tmp_path):
    path = tmp_path / "user.py"
    path.write_text("import torch\n\ndef f(x):\n    return (x * 2).numpy()\n")
    findings = scan_file(path)
    assert [(f.path, f.line, f.code) for f in findings] == [(str(path), 4, "(x * 2).numpy()")]


def test_scan_file_errors_propagate(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan_file(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n")
    with pytest.raises(SyntaxError):
        scan_file(bad)


def test_runtime_premise_matches_static_rule():
    torch = pytest.importorskip("torch")
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="Can't call numpy\\(\\) on Tensor that requires grad"):
        x.numpy()
    with pytest.raises(RuntimeError, match="requires grad"):
        (x * 2).numpy()  # the exact pattern the scanner flags
    with torch.no_grad():
        assert (x * 2).numpy().tolist() == [2.0, 2.0, 2.0]
    assert x.detach().numpy().tolist() == [1.0, 1.0, 1.0]
    assert x.numpy(force=True).tolist() == [1.0, 1.0, 1.0]
    # And the static scanner agrees on the same snippets.
    assert lines("def f(x):\n    return (x * 2).numpy()\n") == [2]
    assert lines("def f(x):\n    with torch.no_grad():\n        return (x * 2).numpy()\n") == []
