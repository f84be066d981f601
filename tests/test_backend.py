"""Backend selection: names, the environment variable, forcing triton where it cannot run."""
import os
import subprocess
import sys

import pytest
import torch

import fastvit
from fastvit.backend import use_triton


def test_default_is_auto_and_roundtrips():
    assert fastvit.get_backend() == "auto"
    with fastvit.use_backend("torch"):
        assert fastvit.get_backend() == "torch"
        assert not use_triton(torch.device("cpu"))
    assert fastvit.get_backend() == "auto"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"set_backend\(name\): unknown backend 'cuda'; expected one of"):
        fastvit.set_backend("cuda")


def test_environment_variable_is_validated():
    env = dict(os.environ, FASTVIT_BACKEND="fast")
    result = subprocess.run([sys.executable, "-c", "import fastvit"], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "FASTVIT_BACKEND: unknown backend 'fast'" in result.stderr


def test_environment_variable_selects_backend():
    env = dict(os.environ, FASTVIT_BACKEND="torch")
    code = "import fastvit; print(fastvit.get_backend())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "torch"


def test_forced_triton_without_interpreter_is_a_clear_error():
    code = (
        "import torch, fastvit\n"
        "fastvit.set_backend('triton')\n"
        "fastvit.ops.layer_norm(torch.randn(2, 8), None, None, 1e-6)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if torch.cuda.is_available():
        pytest.skip("CPU tensors: this checks the error a machine without the interpreter gives")
    assert result.returncode != 0
    assert "backend 'triton' cannot run on device cpu: set TRITON_INTERPRET=1" in result.stderr


def test_auto_falls_back_to_torch_without_interpreter():
    code = (
        "import torch, fastvit\n"
        "x = torch.randn(2, 8)\n"
        "y = fastvit.ops.layer_norm(x, None, None, 1e-6)\n"
        "assert torch.allclose(y, torch.nn.functional.layer_norm(x, (8,), eps=1e-6))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "ok"


def test_interpreter_switched_on_after_import_changes_nothing():
    """The kernels were decorated without the interpreter: 'auto' keeps to torch on CPU instead of calling
    compiled kernels outside a launch."""
    code = (
        "import os, torch, fastvit\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "x = torch.randn(2, 8)\n"
        "assert torch.allclose(fastvit.ops.layer_norm(x, None, None, 1e-6), torch.nn.functional.layer_norm(x, (8,), eps=1e-6))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
