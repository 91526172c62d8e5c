"""Pretraining: LARS and its schedule by hand, the GPU augmentations against torchvision, the CPU smoke
path end to end (train, evaluate the checkpoint, resume after a kill)."""

import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.models.loading import load_model
from ssl_patchbench.pretrain.augment import (
    ViewAugment,
    _blend_slot,
    adjust_hue,
    apply_augment,
    byol_augments,
    color_jitter,
    draw_augment,
    draw_views,
    gaussian_blur,
    make_views,
)
from ssl_patchbench.pretrain.config import AUTO_COMPILE_STEPS
from ssl_patchbench.pretrain.lars import WarmupCosine, build_lars, lars_param_groups
from ssl_patchbench.pretrain.losses import vicreg_views
from ssl_patchbench.pretrain.state import CheckpointWriter
from ssl_patchbench.pretrain.train import (
    PretrainConfig,
    arch_entry,
    build_trainee,
    compile_mode,
    load_images,
    pretrain,
    save_solo_checkpoint,
    setup_run,
)
from ssl_patchbench.sampling.geometry import ATTEMPTS, random_resized_boxes, uniforms_from_array

from .clitools import run_cli as _run

CPU = torch.device("cpu")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- LARS and schedule


@pytest.mark.parametrize("clip", [True, False])
def test_lars_two_steps_match_a_hand_computation(clip):
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    model = torch.nn.Module()
    model.w, model.b = w, b
    opt = build_lars(model, lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.02, trust_clip=clip)
    grads = [torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])]
    w_hand, mu_hand, b_hand, mub_hand = [3.0, 4.0], [0.0, 0.0], 1.0, 0.0
    for g in grads:
        w.grad, b.grad = g.clone(), torch.tensor([2.0])
        g_list = g[0].tolist()
        p_norm = math.hypot(*w_hand)
        ratio = 0.02 * p_norm / (math.hypot(*g_list) + 0.1 * p_norm + 1e-8)
        ratio = min(ratio / 0.5, 1.0) if clip else ratio
        update = [(gi + 0.1 * wi) * ratio for gi, wi in zip(g_list, w_hand, strict=True)]
        mu_hand = [0.9 * m + u for m, u in zip(mu_hand, update, strict=True)]
        w_hand = [wi - 0.5 * m for wi, m in zip(w_hand, mu_hand, strict=True)]
        mub_hand = 0.9 * mub_hand + 2.0  # biases: no decay, no adaptation
        b_hand -= 0.5 * mub_hand
        opt.step()
    assert w.detach()[0].tolist() == pytest.approx(w_hand, rel=1e-6)
    assert b.item() == pytest.approx(b_hand, rel=1e-6)


def test_lars_leaves_zero_weights_to_plain_sgd():
    model = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = build_lars(model, lr=0.1, momentum=0.0, weight_decay=0.5, eta=0.02)
    model.weight.grad = torch.ones(2, 2)
    opt.step()
    assert torch.allclose(model.weight.detach(), torch.full((2, 2), -0.1))


@pytest.mark.slow
def test_the_compiled_update_equals_the_eager_one_and_a_new_lr_does_not_recompile_it():
    """``--compile`` runs LARS under ``torch.compile`` with the learning rate as a device tensor: the weights
    must be the eager optimiser's, and the schedule's new rate every step must not trigger a recompilation."""
    torch.manual_seed(0)
    eager_model = build_trainee(arch_entry("tiny_cifar"))
    compiled_model = build_trainee(arch_entry("tiny_cifar"))
    compiled_model.load_state_dict(eager_model.state_dict())
    settings = {"momentum": 0.9, "weight_decay": 1e-4, "eta": 0.02}
    eager = build_lars(eager_model, lr=0.6, **settings)
    compiled = build_lars(compiled_model, lr=0.6, **settings, compiled=True)
    initial = [p.detach().clone() for p in eager_model.parameters()]
    for step, lr in enumerate([0.06, 0.6, 0.3]):
        for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
            a.grad = torch.randn_like(a) * 1e-2
            b.grad = a.grad.clone()
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            for opt in (eager, compiled):
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert all((p != p0).any() for p, p0 in zip(eager_model.parameters(), initial, strict=True))  # every one moved


def test_param_groups_exclude_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    lars, plain = lars_param_groups(model)
    assert [p.ndim for p in lars["params"]] == [4, 2] and lars["lars"]
    assert all(p.ndim == 1 for p in plain["params"]) and len(plain["params"]) == 4 and not plain["lars"]


def test_the_weight_step_follows_the_warm_up():
    """Unclipped LARS moves every weight by lr * eta * |w| (times |g + wd w| / (|g| + wd |w|)): a tenth of
    the learning rate, a tenth of the step, whatever the gradient's size (clipping broke this, issue 18)."""
    steps = []
    for lr in (0.06, 0.6):
        model = torch.nn.Linear(8, 8, bias=False)
        torch.nn.init.constant_(model.weight, 0.5)
        opt = build_lars(model, lr=lr, momentum=0.9, weight_decay=1e-4, eta=0.02)
        model.weight.grad = torch.full((8, 8), 1e-3)  # parallel to w; tiny: clipped, this is plain SGD
        before = model.weight.detach().clone()
        opt.step()
        steps.append((model.weight.detach() - before).norm().item() / before.norm().item())
    assert steps == pytest.approx([0.06 * 0.02, 0.6 * 0.02], rel=1e-4)


def test_warmup_cosine_schedule():
    s = WarmupCosine(base_lr=1.0, warmup_steps=4, total_steps=14)
    assert [s(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert s(4) == pytest.approx(1.0) and s(9) == pytest.approx(0.5) and s(14) == pytest.approx(0.0)


# ---------------------------------------------------------------- augmentations


def test_views_keep_shape_dtype_range_and_are_deterministic_for_a_seed():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=_gen(1))
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [4.0, 2.0, 20.0, 30.0], [10.0, 10.0, 17.0, 15.0]]).repeat(6, 1)
    kwargs = {"boxes": boxes, "n_views": 3, "out_size": 16}
    augs = (ViewAugment(blur=1.0), ViewAugment(solarize=0.5))
    views = make_views(images, augments=augs, gen=_gen(7), **kwargs)
    assert views.shape == (3, 6, 3, 16, 16) and views.dtype == torch.float32
    assert views.min() >= 0 and views.max() <= 1
    assert torch.equal(views, make_views(images, augments=augs, gen=_gen(7), **kwargs))
    assert not torch.equal(views, make_views(images, augments=augs, gen=_gen(8), **kwargs))


def test_blends_match_torchvision_per_image():
    x = torch.rand(6, 3, 8, 8, generator=_gen(2))
    factors = torch.rand(3, 6, generator=_gen(3)) * 1.5
    op = torch.tensor([0, 1, 2, 3, 0, 2])
    got = _blend_slot(x, op, factors)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for i in range(6):
        expected = x[i] if op[i] == 3 else fns[op[i]](x[i], float(factors[op[i], i]))
        assert torch.allclose(got[i], expected, atol=1e-6)


def test_hue_and_blur_match_torchvision_per_image():
    x = torch.rand(4, 3, 16, 16, generator=_gen(4))
    shift = torch.tensor([-0.4, -0.1, 0.05, 0.5])
    sigma = torch.tensor([0.0, 0.3, 1.0, 2.0])
    hue, blur = adjust_hue(x, shift), gaussian_blur(x, sigma, kernel_size=5)
    for i in range(4):
        assert torch.allclose(hue[i], TF.adjust_hue(x[i], float(shift[i])), atol=1e-5)
        expected = x[i] if sigma[i] == 0 else TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2)
        assert torch.allclose(blur[i], expected, atol=1e-5)


def test_color_jitter_is_torchvision_color_jitter_in_each_images_order():
    aug = ViewAugment()
    x = torch.rand(8, 3, 8, 8, generator=_gen(5))
    got = color_jitter(x, draw_augment(8, aug, _gen(9), CPU))
    g = _gen(9)  # replay the draws: flip, then on/off, three factors, hue shift, each image's order
    torch.rand(8, generator=g)
    on = torch.rand(8, generator=g) < aug.jitter
    factors = [0.6 + 0.8 * torch.rand(8, generator=g), 0.6 + 0.8 * torch.rand(8, generator=g)]
    factors.append(0.8 + 0.4 * torch.rand(8, generator=g))
    shift = -0.1 + 0.2 * torch.rand(8, generator=g)
    order = torch.argsort(torch.rand((8, 4), generator=g), dim=1)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(8):
        expected = x[i]
        for op in order[i].tolist() if on[i] else []:
            expected = fns[op](expected, float(shift[i] if op == 3 else factors[op][i]))
        assert torch.allclose(got[i], expected, atol=1e-5)


def test_grayscale_and_solarize_match_torchvision():
    x = torch.rand(3, 3, 8, 8, generator=_gen(6))
    always = ViewAugment(flip=0.0, jitter=0.0, grayscale=1.0, solarize=1.0)
    expected = torch.stack([TF.solarize(TF.rgb_to_grayscale(im, 3), 0.5) for im in x])
    assert torch.allclose(apply_augment(x, draw_augment(3, always, _gen(), CPU), blur=False), expected, atol=1e-6)


# ---------------------------------------------------------------- the CPU smoke path


def _cfg(**overrides) -> PretrainConfig:
    base = {"arch": "tiny_cifar", "dataset": "digits", "train_per_class": 3, "epochs": 2, "batch_size": 10,
            "device": "cpu", "log_every": 1}  # fmt: skip
    return PretrainConfig(**{**base, **overrides})


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_after_a_kill_continues_exactly(tmp_path):
    pretrain(_cfg(), tmp_path / "straight")
    pretrain(_cfg(), tmp_path / "killed", stop_after=1)
    assert _weights(tmp_path / "killed" / "last.ckpt")["epoch"] == 1
    pretrain(_cfg(), tmp_path / "killed")
    straight, resumed = _weights(tmp_path / "straight" / "last.ckpt"), _weights(tmp_path / "killed" / "last.ckpt")
    assert resumed["epoch"] == 2 and resumed["global_step"] == straight["global_step"]
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    momentum = [s["momentum_buffer"] for s in straight["optimizer"]["state"].values()]
    assert all(
        torch.equal(a, s["momentum_buffer"])
        for a, s in zip(momentum, resumed["optimizer"]["state"].values(), strict=True)
    )


def test_epoch_boxes_are_a_pure_function_of_seed_and_epoch():
    """What lets the trainer draw the next epoch's boxes during this one, and a resumed run draw the same."""
    run, again, other = setup_run(_cfg()), setup_run(_cfg()), setup_run(_cfg(seed=1))
    assert torch.equal(run.epoch_boxes(1), again.epoch_boxes(1))
    assert not torch.equal(run.epoch_boxes(0), run.epoch_boxes(1))
    assert not torch.equal(run.epoch_boxes(1), other.epoch_boxes(1))
    assert run.epoch_boxes(0).shape == (run.steps_per_epoch, 2 * 10, 4)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
def test_a_checkpoint_holds_the_state_at_submit_even_as_training_goes_on(tmp_path, device):
    """The writer copies on the device and moves the copy to the host on a side stream: the file must hold
    the values of the moment of ``submit``, not those of the steps queued after it."""
    weights = torch.arange(2**22, dtype=torch.float32, device=device)
    expected = weights.cpu().clone()
    writer = CheckpointWriter()
    writer.submit(tmp_path / "c.ckpt", {"w": weights, "n": 3}, torch.device(device))
    for _ in range(50):  # the next "epoch": in place, queued right behind the copy
        weights.mul_(1.5).add_(1.0)
    writer.wait()
    saved = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert saved["n"] == 3 and torch.equal(saved["w"], expected)


def test_resume_refuses_a_different_run(tmp_path):
    pretrain(_cfg(epochs=1), tmp_path)
    with pytest.raises(UserError, match="different run"):
        pretrain(_cfg(epochs=1, scale=(0.5, 0.5)), tmp_path)


def test_tcr_with_more_patches_and_bf16_autocast_on_cpu(tmp_path):
    result = pretrain(_cfg(method="tcr", num_patches=3, precision="bf16", epochs=1), tmp_path)
    state = _weights(result.checkpoint)
    assert math.isfinite(result.final_loss) and result.final_loss < 0  # -rate - lambda * cosine
    assert all(v.dtype in (torch.float32, torch.int64) for v in state["state_dict"].values())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config"]["method"] == "tcr" and config["autocast"] == "torch.bfloat16"


def test_cli_pretrain_then_eval_loads_the_checkpoint(capsys, monkeypatch, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--arch", "tiny_cifar", "--dataset", "digits", "--train-per-class", "3", "--epochs", "1",
            "--batch-size", "10", "--scale", "0.2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    code, stdout, err = _run(capsys, monkeypatch, *args)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["epochs_done"] == 1 and summary["seconds_per_epoch"] > 0 and "loss" in err
    assert (out / "config.json").exists() and (out / "metrics.jsonl").exists()
    code, stdout, err = _run(capsys, monkeypatch, "eval", "--model", "tiny_cifar", "--checkpoint",
                             str(out / "last.ckpt"), "--dataset", "digits", "--train-per-class", "3",
                             "--test-per-class", "2", "--patches", "central,2", "--patch-scale", "0.2",
                             "--eval", "knn", "--device", "cpu", "--json")  # fmt: skip
    assert code == 0, err
    assert [json.loads(line)["patches"] for line in stdout.splitlines()] == ["central", 2]


def test_cli_pretrain_user_errors(capsys, monkeypatch, tmp_path):
    code, _, err = _run(capsys, monkeypatch, "pretrain", "--dataset", "digits", "--scale", "0.5,0.2", "--out",
                        str(tmp_path))  # fmt: skip
    assert code == 2 and err.startswith("error: --scale")
    for weights in ("25,25", "25,-1,1", "25,nan,1", "a,b,c"):
        code, _, err = _run(capsys, monkeypatch, "pretrain", "--dataset", "digits", "--vicreg-weights", weights,
                            "--out", str(tmp_path))  # fmt: skip
        assert code == 2 and "--vicreg-weights" in err and "3 comma-separated numbers >= 0" in err
        assert len(err.strip().splitlines()) == 1


def test_the_demo_reuses_its_model_only_when_trained_with_the_same_recipe(tmp_path, monkeypatch):
    """The demo's checkpoint is named by its recipe: a file of the old name, or of another recipe (e.g. from
    before a change of defaults), is not handed back as the demo's model."""
    from types import SimpleNamespace

    from ssl_patchbench.pretrain import train
    from ssl_patchbench.pretrain.config import PretrainConfig

    (tmp_path / "tiny_vicreg_digits_1ep.ckpt").write_text("the name before recipes")
    trained = []

    def fake_pretrain(cfg, run_dir, resume, reporter):
        trained.append(cfg)
        run_dir.mkdir(parents=True)
        (run_dir / "last.ckpt").write_text(f"weights {cfg.vicreg_coefficients}")
        return SimpleNamespace(checkpoint=run_dir / "last.ckpt")

    monkeypatch.setattr(train, "pretrain", fake_pretrain)
    path = train.pretrain_demo_model(tmp_path, epochs=1, device="cpu")
    assert len(trained) == 1 and path.read_text() == "weights (25.0, 50.0, 1.0)"
    assert train.pretrain_demo_model(tmp_path, epochs=1, device="cpu") == path and len(trained) == 1
    bardes = {"vicreg_coefficients": (25.0, 25.0, 1.0)}
    monkeypatch.setattr(train, "PretrainConfig", lambda **options: PretrainConfig(**{**options, **bardes}))
    other = train.pretrain_demo_model(tmp_path, epochs=1, device="cpu")
    assert other != path and len(trained) == 2 and other.read_text() == "weights (25.0, 25.0, 1.0)"


def test_vicreg_weights_reach_the_objective():
    from ssl_patchbench.pretrain.config import PretrainConfig
    from ssl_patchbench.pretrain.losses import vicreg_views
    from ssl_patchbench.pretrain.train import _objective

    z = [torch.randn(8, 5, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    got = _objective(PretrainConfig(vicreg_coefficients=(1.0, 50.0, 2.0)))(z).item()
    assert got == pytest.approx(vicreg_views(torch.stack(z), sim=1.0, var=50.0, cov=2.0).item(), rel=1e-6)
    assert got != pytest.approx(vicreg_views(torch.stack(z)).item(), rel=1e-3)
    with pytest.raises(UserError, match="--vicreg-weights takes 3"):
        PretrainConfig(vicreg_coefficients=(25.0, -1.0, 1.0))


@pytest.mark.slow
def test_resnet50_checkpoints_load_through_the_resnet50_solo_zoo_entry(tmp_path):
    trainee = build_trainee(arch_entry("resnet50"))  # what `pretrain --arch resnet50` trains and saves
    path = tmp_path / "last.ckpt"
    save_solo_checkpoint(path, trainee.backbone, trainee.projector, {"arch": "resnet50"})
    loaded = load_model("resnet50_solo", checkpoint=path)
    assert (loaded.embed_dim, loaded.projection_dim) == (2048, 8192)
    for mine, theirs in ((trainee.backbone, loaded.backbone), (trainee.projector, loaded.projector)):
        expected, got = mine.state_dict(), theirs.state_dict()
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_compile_auto_uses_cuda_graphs_only_for_long_cuda_runs():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_mode(_cfg(), cuda, AUTO_COMPILE_STEPS) == "cudagraphs"
    assert compile_mode(_cfg(), cuda, AUTO_COMPILE_STEPS - 1) == "off"
    assert compile_mode(_cfg(), cpu, 10**9) == "off"
    assert compile_mode(_cfg(compile="on"), cpu, 1) == "on" and compile_mode(_cfg(compile="off"), cuda, 10**9) == "off"
    with pytest.raises(UserError, match="unknown --compile"):
        _cfg(compile="yes")


@pytest.mark.slow
def test_the_views_model_and_loss_trace_as_one_graph_each():
    """The compile leads of issue 18: with the random numbers drawn first, the views function (crop, colour
    augmentation, normalisation), the model and the loss each trace into one graph without a break."""
    run = setup_run(_cfg(batch_size=8))
    boxes, batch = run.epoch_boxes(0)[0], run.images[:8]
    draws, blurs = draw_views(8, 2, run.augments, run.gen, CPU)
    views = run.views(batch, boxes, draws, blurs)
    z = [run.model(v) for v in views]
    for fn, args in ((run.views, (batch, boxes, draws, blurs)), (run.model, (views[0],)), (run.objective, (z,))):
        explained = torch._dynamo.explain(fn)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["on", "cudagraphs"])
def test_the_compiled_step_gives_the_eager_views_loss_and_gradients(mode):
    """``--compile`` changes no number: with the same random numbers the compiled views function returns the
    eager views, and a compiled step the eager loss, gradients and updated weights (float tolerance). On the
    CPU ``cudagraphs`` compiles as ``on`` (no CUDA graphs): this checks the step's extra bookkeeping."""
    runs = {name: setup_run(_cfg(compile=name, batch_size=8)) for name in ("off", mode)}
    got = {}
    for name, run in runs.items():
        boxes, index = run.epoch_boxes(0)[0], torch.arange(8)
        draws, blurs = draw_views(8, 2, run.augments, _gen(4), CPU)
        views = run.views(run.images[index], boxes, draws, blurs)
        loss = run.step(index, boxes, global_step=3)
        grads = [p.grad.clone() for p in run.model.parameters()]
        got[name] = (views, loss, grads, [p.detach().clone() for p in run.model.parameters()])
    (views, loss, grads, weights), (views_c, loss_c, grads_c, weights_c) = got["off"], got[mode]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(views, views_c, strict=True))
    assert torch.allclose(loss, loss_c, rtol=1e-4)
    # relative to each gradient's norm, with a floor for the biases before a batch norm (their gradient is 0 but
    # for rounding)
    assert all((a - b).norm() <= 1e-4 * a.norm() + 1e-4 for a, b in zip(grads, grads_c, strict=True))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(weights, weights_c, strict=True))


# ---------------------------------------------------------------- stability (issue 18)


@pytest.mark.slow
def test_a_short_warm_up_trains_a_resnet18_as_stably_as_the_reference(cifar_dir):
    """ResNet-18 (CIFAR stem) at the peak lr of batch 512 (0.6) after a 6-step warm-up: the trainer's
    optimiser recipe must stay finite like the independent VICReg step. With trust clipping (before the fix)
    the loss went 28 -> 32 -> 314 in steps 4 to 5, and to inf by step 10 (16 px views: a minute on a busy CPU)."""
    from .vicreg_reference import ReferenceLARS, reference_step

    cfg = PretrainConfig(arch="resnet18_cifar", dataset="cifar10", data_dir=str(cifar_dir), device="cpu")
    images, _ = load_images(PretrainConfig(**{**cfg.__dict__, "batch_size": 32}), CPU)
    mean, std = torch.tensor((0.49, 0.48, 0.45)).view(1, 3, 1, 1), torch.tensor((0.25, 0.24, 0.26)).view(1, 3, 1, 1)
    schedule = WarmupCosine(0.6, warmup_steps=6, total_steps=60)
    losses = {}
    for name in ("trainer", "reference"):
        torch.manual_seed(0)
        model = build_trainee(arch_entry("resnet18_cifar")).train()
        if name == "trainer":
            opt = build_lars(model, lr=0.6, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.eta,
                             trust_clip=cfg.trust_clip)  # fmt: skip
        else:
            opt = ReferenceLARS(model.parameters(), lr=0.6, weight_decay=cfg.weight_decay)
        gen, rng = _gen(1), np.random.default_rng(0)
        losses[name] = []
        for step in range(8):
            batch = images[torch.randperm(len(images), generator=gen)[:32]]
            u = rng.random((64, ATTEMPTS, 4))
            boxes = random_resized_boxes(uniforms_from_array(u), np.full(64, 32), np.full(64, 32), scale=(0.08, 1.0),
                                         ratio=(3 / 4, 4 / 3))  # fmt: skip
            views = make_views(batch, torch.from_numpy(boxes).float(), n_views=2, out_size=16,
                               augments=byol_augments(32), gen=gen)  # fmt: skip
            x, y = ((v - mean) / std for v in views)
            if name == "reference":
                losses[name].append(reference_step(model, opt, x, y, schedule(step)).item())
                continue
            for group in opt.param_groups:
                group["lr"] = schedule(step)
            loss = vicreg_views(torch.stack([model(x), model(y)]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    for name, curve in losses.items():
        assert all(math.isfinite(v) for v in curve), (name, curve)
        assert max(curve) < 1.5 * curve[0], (name, curve)


# ---------------------------------------------------------------- progress


def test_line_reporter_shows_epoch_step_loss_rate_and_eta(capsys):
    from ssl_patchbench.cli.pretrain import LineReporter
    from ssl_patchbench.pretrain.train import Progress

    progress = Progress(epoch=2, epochs=10, step=50, steps=97, loss=19.25, lr=0.6, images_per_s=21500.0,
                        seconds=1.2, eta_s=3723.4)  # fmt: skip
    LineReporter().on_step(progress)
    LineReporter().on_epoch(Progress(**{**progress.__dict__, "eta_s": 62.0}))
    step_line, epoch_line = capsys.readouterr().err.splitlines()
    assert step_line == "epoch 3/10 step 50/97 loss 19.2500 lr 0.6000 21,500 img/s eta 1:02:03"
    assert epoch_line.startswith("epoch 3/10 done: loss 19.2500") and epoch_line.endswith("eta 1:02")


def test_the_eta_counts_the_steps_left_at_this_calls_step_time(tmp_path):
    seen = []

    class Recorder:
        def on_step(self, p):
            seen.append(p)

        def on_epoch(self, p):
            seen.append(p)

    pretrain(_cfg(epochs=2), tmp_path, reporter=Recorder())
    last_step, last_epoch = seen[-2], seen[-1]
    assert last_step.step == last_epoch.steps == 3 and last_epoch.eta_s == 0.0
    first = seen[0]  # after 1 of 6 steps: 5 steps left at the time the first one took
    assert first.eta_s > 0 and first.step == 1


# ---------------------------------------------------------------- views as RandomResizedCrop cuts them


def test_views_are_torchvisions_bicubic_resized_crop_of_the_pil_image():
    """No colour augmentation: each view is ``TF.resized_crop(pil, top, left, h, w, 32, BICUBIC)`` (solo-learn's
    and VICReg's RandomResizedCrop) up to Pillow's rounding to uint8, away from the crop's border: there the
    cubic's taps read the image's pixels beyond the box, where Pillow, given only the crop, repeats its edge."""
    from PIL import Image

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=_gen(3))
    u = np.random.default_rng(1).random((6, ATTEMPTS, 4))
    boxes = random_resized_boxes(uniforms_from_array(u), np.full(6, 32), np.full(6, 32), scale=(0.08, 1.0),
                                 ratio=(3 / 4, 4 / 3))  # fmt: skip
    plain = ViewAugment(flip=0.0, jitter=0.0, grayscale=0.0, solarize=0.0)
    views = make_views(images, torch.from_numpy(boxes).float(), n_views=2, out_size=32, augments=(plain,), gen=_gen())
    for row, (x1, y1, x2, y2) in enumerate(boxes.astype(int).tolist()):
        pil = Image.fromarray(images[row % 3].permute(1, 2, 0).numpy())
        crop = TF.resized_crop(pil, y1, x1, y2 - y1, x2 - x1, [32, 32], TF.InterpolationMode.BICUBIC)
        expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255
        error = (views[row // 3, row % 3] - expected).abs()
        assert error[:, 3:-3, 3:-3].max() <= 1.1 / 255 and error.mean() < 2.5 / 255, row
