"""The repository layout against the packages users have installed: our Triton kernels live in the top-level
`kernels/` folder and install as `transformer_kernels.kernels`, and nothing of ours may answer `import kernels` from
the repository root — that name is Hugging Face's kernel-hub client, which transformers imports."""

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    """`python -c code` with the repository root as working directory: first on sys.path, as for `python -m pytest`."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _spec_of_kernels() -> dict:
    code = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
            "print(json.dumps(None if s is None else {'origin': s.origin, "
            "'locations': list(s.submodule_search_locations or [])}))")
    result = _run_from_root(code)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _hub_client_installed() -> bool:
    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        return False
    return True


def test_import_kernels_from_the_root_is_never_our_folder():
    spec = _spec_of_kernels()
    ours = ROOT / "kernels"
    if _hub_client_installed():
        # A regular package anywhere on sys.path beats a namespace portion, so theirs wins over our folder.
        assert spec is not None and spec["origin"] is not None
        assert not Path(spec["origin"]).resolve().is_relative_to(ours.resolve()), spec
        theirs = Path(metadata.distribution("kernels").locate_file("kernels/__init__.py"))
        assert Path(spec["origin"]).resolve() == theirs.resolve()
    else:
        # Without theirs, at most a namespace portion (no __init__.py, so no code of ours runs under that name).
        assert spec is None or spec["origin"] in (None, "namespace"), spec
    assert not (ours / "__init__.py").exists()


def test_our_kernels_install_as_transformer_kernels_kernels():
    from transformer_kernels.kernels import attention, config

    assert Path(attention.__file__).resolve() == (ROOT / "kernels" / "attention.py").resolve()
    assert config.__name__ == "transformer_kernels.kernels.config"


def test_transformers_and_our_integration_import_from_the_root():
    pytest.importorskip("transformers")
    code = ("import transformers.integrations.hub_kernels, kernels, transformer_kernels as tk; "
            "from transformer_kernels.integrations import huggingface; "
            "import torch; q = torch.randn(1, 2, 4, 16); "
            "torch.testing.assert_close(tk.ops.attention(q, q, q, backend='triton'), "
            "torch.nn.functional.scaled_dot_product_attention(q, q, q)); print(kernels.__name__)")
    result = _run_from_root(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["kernels"]


def test_a_failing_transformers_import_is_reported_as_such():
    pytest.importorskip("transformers")
    # transformers installed, one of its modules failing to import: the message must carry that failure.
    code = ("import sys; sys.modules['transformers.masking_utils'] = None\n"
            "try:\n    import transformer_kernels.integrations.huggingface\n"
            "except ImportError as e:\n    print(e)\n")
    result = _run_from_root(code)
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert f"transformers {metadata.version('transformers')} is installed but importing it failed" in message, message
    assert "transformers.masking_utils" in message, message
    assert "pip install" not in message, message
