"""The settings of a pretraining run: validated once, saved beside the checkpoint, compared on resume."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ssl_patchbench.core.errors import UserError

METHODS = ("vicreg", "tcr")
# --compile: the torch.compile mode of views, model and loss (None: eager). "cudagraphs" also replays each
# compiled graph as a CUDA graph (torch.compile's "reduce-overhead"): the step no longer waits on launches.
# "auto" (the default) is "cudagraphs" on CUDA for runs of at least AUTO_COMPILE_STEPS steps, else "off".
COMPILE_MODES = {"off": None, "on": "default", "cudagraphs": "reduce-overhead"}
# Measured on one H200 (2026-12-01, benchmarks/RESULTS.md): cudagraphs 1.78 s against 3.16 s eager per 97-step
# CIFAR-10 epoch (14 ms a step saved) after 25-46 s of compilation: it pays off after about 3,000 steps.
AUTO_COMPILE_STEPS = 3000
INTERPOLATIONS = ("bicubic", "bilinear")
# Settings that do not change the numbers a run produces; a resumed run may change them.
_RUNTIME_FIELDS = ("device", "log_every", "save_every", "compile", "home", "download")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that defines a pretraining run (saved as ``OUT/config.json`` and in the checkpoint)."""

    method: str = "vicreg"
    arch: str = "resnet18_cifar"
    dataset: str = "cifar10"
    data_dir: str | None = None
    train_per_class: int | None = None
    scale: tuple[float, float] = (0.2, 0.2)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"  # of the views' RandomResizedCrop, as solo-learn's and VICReg's recipes
    num_patches: int = 2
    epochs: int = 100
    batch_size: int = 512
    lr: float = 0.3  # per 256 images; the run uses lr * batch_size / 256
    weight_decay: float = 1e-4
    momentum: float = 0.9
    eta: float = 0.02  # LARS trust coefficient
    trust_clip: bool = False  # LARC's min(ratio / lr, 1): diverges with short warm-ups (pretrain/lars.py)
    warmup_epochs: float = 10.0  # at most a tenth of the run
    # solo-learn's VICReg (its variance hinge summed over the two views): 3.6 points of kNN@20 over Bardes et al.'s
    # 25/25/1 after 10 CIFAR-10 epochs on one H200 (67.9 against 64.3, benchmarks/RESULTS.md run 12)
    vicreg_coefficients: tuple[float, float, float] = (25.0, 50.0, 1.0)
    tcr_eps: float = 0.2
    tcr_lambda: float = 200.0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = True
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    save_every: int = 1
    compile: str = "auto"  # "auto" or a key of COMPILE_MODES
    home: str | None = None
    download: bool = False

    def __post_init__(self) -> None:
        _validate(self)

    def identity(self) -> dict:
        """The fields that change the numbers: a resumed run must match them."""
        return {k: v for k, v in jsonable(asdict(self)).items() if k not in _RUNTIME_FIELDS}


def _validate(cfg: PretrainConfig) -> None:
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    lo, hi = cfg.scale
    if not 0 < lo <= hi <= 1:
        raise UserError(f"--scale must satisfy 0 < min <= max <= 1 (fraction of image area), got {cfg.scale}")
    if not 0 < cfg.ratio[0] <= cfg.ratio[1] < float("inf"):
        raise UserError(f"aspect ratio range must satisfy 0 < min <= max < inf, got {cfg.ratio}")
    if cfg.num_patches < 2:
        raise UserError(f"--num-patches must be at least 2 (views compared per image), got {cfg.num_patches}")
    for name in ("epochs", "batch_size", "log_every", "save_every"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.batch_size < 2:
        raise UserError("--batch-size must be at least 2: the losses need batch statistics")
    if cfg.compile != "auto" and cfg.compile not in COMPILE_MODES:
        raise UserError(f"unknown --compile {cfg.compile!r}: choose auto or one of {', '.join(COMPILE_MODES)}")
    if cfg.interpolation not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation {cfg.interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
    if len(cfg.vicreg_coefficients) != 3 or not all(0 <= c < float("inf") for c in cfg.vicreg_coefficients):
        raise UserError(f"--vicreg-weights takes 3 finite numbers >= 0, got {cfg.vicreg_coefficients}")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"unknown precision {cfg.precision!r}: choose auto, bf16 or fp32")


def jsonable(value):
    """Tuples become lists, so a config compares equal after a JSON or checkpoint round trip."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
