import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CHECKPOINT = SHARED / "checkpoints" / "vicreg_resnet18_cifar10.ckpt"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own cache root: no test reads another's stores or results."""
    monkeypatch.setenv("PATCHBENCH_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """A 10-class CIFAR-10 ImageFolder subset (20 train and 20 test images per class) from ../shared."""
    if not (SHARED / "data" / "materialize.py").exists():
        pytest.skip("../shared/data is not beside the repository")
    out = tmp_path_factory.mktemp("data")
    subprocess.run(
        [sys.executable, str(SHARED / "data" / "materialize.py"), "cifar10", str(out), "--per-class", "20"],
        check=True,
        capture_output=True,
    )
    return out / "cifar10"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised ``tiny_cifar`` model saved in solo-learn's layout."""
    import torch

    from ssl_patchbench.models.archs import build_backbone, build_projector
    from ssl_patchbench.models.registry import get_entry
    from ssl_patchbench.pretrain.train import save_solo_checkpoint

    torch.manual_seed(0)
    entry = get_entry("tiny_cifar")
    backbone, dim = build_backbone(entry.arch, stem=entry.stem)
    projector = build_projector(dim, entry.projector, batchnorm=entry.projector_batchnorm)
    for module in (*backbone.modules(), *projector.modules()):  # non-trivial BN statistics
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    save_solo_checkpoint(path, backbone, projector, {"method": "random"})
    return path


@pytest.fixture
def ctx(tmp_path, tiny_checkpoint, cifar_dir, monkeypatch):
    """A reliability case's context: a scratch folder, the tiny checkpoint and the CIFAR subset."""
    from .factories import Ctx

    return Ctx(tmp_path, tiny_checkpoint, cifar_dir, monkeypatch)
