"""Architectures spread over several files (--include), and the requirements their imports bring."""

from __future__ import annotations

import json
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import torch
from conftest import make_venv, nnwheel

from nnwheel.sources.arch import ArchSpec, third_party_requirements

NET = """\
import torch
from blocks import Residual
from blocks.scale import half


class Net(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.inner = Residual(width)

    def forward(self, x):
        return half(self.inner(x))
"""


def _arch_with_a_local_package(root: Path) -> Path:
    (root / "blocks").mkdir()
    (root / "blocks" / "__init__.py").write_text(
        "import torch\n\nclass Residual(torch.nn.Module):\n"
        "    def __init__(self, width):\n        super().__init__()\n        self.linear = torch.nn.Linear(width, width)\n\n"
        "    def forward(self, x):\n        return x + self.linear(x)\n"
    )
    (root / "blocks" / "scale.py").write_text("def half(x):\n    return x / 2\n")
    (root / "net.py").write_text(NET)
    return root / "net.py"


def test_included_local_package_travels_with_the_model(tmp_path):
    arch = _arch_with_a_local_package(tmp_path)
    torch.manual_seed(0)
    weights = {"inner.linear.weight": torch.randn(8, 8), "inner.linear.bias": torch.randn(8)}
    torch.save(weights, tmp_path / "net.pth")
    refused = nnwheel("wrap", tmp_path / "net.pth", "--name", "residual-net", "--arch", f"{arch}:Net",
                      "--input-shape", "-1,8", "--out", tmp_path / "dist", check=False)
    assert refused.returncode != 0 and f"add them: --include {tmp_path / 'blocks'}\n" in refused.stderr
    wheel = nnwheel("wrap", tmp_path / "net.pth", "--name", "residual-net", "--arch", f"{arch}:Net",
                    "--include", tmp_path / "blocks", "--input-shape", "-1,8", "--out", tmp_path / "dist").stdout.split()[-1]
    env = make_venv(tmp_path / "env")
    env.pip("install", "--no-deps", wheel)
    x = torch.randn(3, 8)
    outputs = json.loads(env.run(f"import json, residual_net; print(json.dumps(residual_net.predict({x.tolist()!r}).tolist()))",
                                 cwd=tmp_path / "dist").stdout)
    expected = (x + x @ weights["inner.linear.weight"].T + weights["inner.linear.bias"]) / 2
    torch.testing.assert_close(torch.tensor(outputs), expected, atol=1e-6, rtol=0)


def test_installed_third_party_imports_become_requirements(tmp_path):
    arch = tmp_path / "uses_sklearn.py"
    arch.write_text("import json\nimport numpy\nimport torch\nfrom sklearn.preprocessing import StandardScaler\n")
    import sklearn

    requirements = third_party_requirements(ArchSpec(file=arch, class_name="X"))
    major_minor = ".".join(sklearn.__version__.split(".")[:2])
    assert requirements == [f"scikit-learn>={major_minor}"]


def test_requirements_reach_the_wheel_metadata(tmp_path):
    arch = tmp_path / "model.py"
    arch.write_text("import torch\nimport sklearn\n\nclass M(torch.nn.Linear):\n    def __init__(self):\n        super().__init__(4, 2)\n")
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "m.pth")
    wheel = nnwheel("wrap", tmp_path / "m.pth", "--name", "sk-model", "--arch", f"{arch}:M", "--input-shape", "-1,4",
                    "--requires", "pillow>=10", "--out", tmp_path).stdout.split()[-1]
    with zipfile.ZipFile(wheel) as archive:
        metadata = HeaderParser().parsestr(archive.read("sk_model-0.1.0.dist-info/METADATA").decode())
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("scikit-learn>=") for r in requires) and "pillow>=10" in requires
