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
