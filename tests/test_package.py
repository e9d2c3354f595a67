"""Package-level guarantees: import needs only torch and probes no device."""

import subprocess
import sys


def test_import_needs_only_torch_and_probes_no_device():
    code = (
        "import sys, torch\n"
        "calls = []\n"
        "torch.cuda.is_available = lambda: calls.append('is_available') or False\n"
        "torch.cuda.device_count = lambda: calls.append('device_count') or 0\n"
        "import repblend_fast\n"
        "heavy = [m for m in ('triton', 'timm', 'transformers', 'safetensors', 'matplotlib')\n"
        "         if m in sys.modules]\n"
        "assert not calls, calls\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_public_api_entry_points_resolve():
    import repblend_fast as rf

    for name in rf._LAZY:
        assert getattr(rf, name) is not None, name
    cfg = rf.preset("demo")
    assert isinstance(cfg, rf.DistillConfig)


def test_evaluation_modules_import_downward():
    """``evaluate_saved`` sits above ``evaluate``, ``coresets`` and ``features``: none of these
    imports it (or each other upward), at module level or inside a function."""
    import ast
    from pathlib import Path

    import repblend_fast

    root = Path(repblend_fast.__file__).parent

    def imported(mod: str) -> set[str]:
        tree = ast.parse((root / f"{mod}.py").read_text())
        return {
            n.module.removeprefix("repblend_fast.")
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("repblend_fast")
        }

    assert not imported("features") & {"evaluate", "coresets", "evaluate_saved"}
    assert not imported("coresets") & {"evaluate", "evaluate_saved"}
    assert "evaluate_saved" not in imported("evaluate")
    import repblend_fast.evaluate as ev

    assert "__getattr__" not in vars(ev)


def test_file_format_names_are_not_module_paths():
    """A checkpoint's header names its format; moving the module that writes it must not rename
    the format, or every earlier run's checkpoint would be refused on resume."""
    from repblend_fast.engine import checkpoint

    assert checkpoint.KIND == "repblend_fast.checkpoint"


def test_engine_imports_nothing_above_it():
    """The engine (repblend_fast/engine/) sits below the command line, the benchmarks, evaluation,
    the reports and the research-script compatibility layer: none of its modules imports them,
    at module level or inside a function."""
    import ast
    from pathlib import Path

    import repblend_fast

    above = {
        "cli", "bench", "demo", "report", "evaluate", "evaluate_saved", "coresets",
        "pipeline", "describe", "profiling", "compat",
    }  # fmt: skip
    found = []
    for path in (Path(repblend_fast.__file__).parent / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "repblend_fast" and len(parts) > 1 and parts[1] in above:
                    found.append(f"{path.name}: {name}")
    assert not found, found
