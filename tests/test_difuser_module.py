"""DiFuserModule: CLI fit + test (checkpoint reload) on both tiny configs, frozen parts, losses, metrics, schedule."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_cli.cli import main
from lightning_modules.difuser import DiFuserModule
from metrics.geobench import task_metrics
from networks.difuser import GlobalWeightedFusion, LinearClassificationHead
from tests.fixtures.make_geobench import write_cashew_plant, write_eurosat
from tests.test_difuser_extractor import images, tiny_extractor

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"


@pytest.mark.parametrize(
    ("config", "write_task", "metric"),
    [
        ("difuser_cls.yaml", write_eurosat, "test/accuracy"),
        ("difuser_seg.yaml", write_cashew_plant, "test/miou"),
    ],
)
def test_cli_fit_then_test_from_checkpoint(tmp_path, config, write_task, metric):
    root = tmp_path / "geobench"
    write_task(root)
    cache = tmp_path / "cache"
    args = [
        "--config", str(CONFIGS / config),
        "--data.init_args.root", str(root),
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--model.init_args.cache_dir", str(cache),
    ]  # fmt: skip
    fit = main(["fit", *args])
    model = fit.model
    assert model.task["num_classes"] == fit.datamodule.num_classes  # linked from the datamodule
    assert model.task["task_type"] == fit.datamodule.task_type
    assert fit.trainer.callback_metrics["val/loss"].isfinite()
    # only fusion and head are optimised; the extractor never received a gradient
    optimised = {id(p) for group in fit.trainer.optimizers[0].param_groups for p in group["params"]}
    trainable = {id(p) for p in [*model.fusion.parameters(), *model.head.parameters()]}
    assert optimised == trainable
    assert all(p.grad is None and not p.requires_grad for p in model.extractor.parameters())
    # features were cached once per train/val sample
    assert len(list(cache.rglob("*.safetensors"))) == 5

    last = next((tmp_path / "run").rglob("last.ckpt"))
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert not any(key.startswith("extractor.") for key in checkpoint["state_dict"])
    assert any(key.startswith("head.") for key in checkpoint["state_dict"])
    assert checkpoint["difuser_task"]["num_classes"] == fit.datamodule.num_classes

    test = main(["test", *args, "--ckpt_path", str(last)])
    trained = model.state_dict()
    for key, value in test.model.state_dict().items():
        if key.startswith(("fusion.", "head.")):
            assert torch.equal(value, trained[key]), key
    assert metric in test.trainer.callback_metrics
    if metric == "test/miou":  # per-class IoU named after the datamodule's class names
        assert "test/iou_well-managed_plantation" in test.trainer.callback_metrics
    assert "test/loss" in test.trainer.callback_metrics

    # the checkpoint also loads without a trainer (task read from the checkpoint)
    reloaded = DiFuserModule.load_from_checkpoint(
        last, extractor=model.extractor, fusion=partial(GlobalWeightedFusion, out_channels=16, bottleneck_channels=8),
        head=type(model.head) if config == "difuser_cls.yaml" else partial(type(model.head), channels=16),
    )  # fmt: skip
    for key, value in model.head.state_dict().items():
        assert torch.equal(reloaded.head.state_dict()[key], value), key


def small_module(task_type: str, num_classes: int = 3, **kwargs) -> DiFuserModule:
    module = DiFuserModule(
        tiny_extractor(timesteps=[1, 100], num_inversion_steps=4),
        fusion=partial(GlobalWeightedFusion, out_channels=8, bottleneck_channels=8),
        head=LinearClassificationHead,
        num_classes=num_classes,
        task_type=task_type,
        **kwargs,
    )
    module.configure_model()
    return module


def test_training_loss_reaches_fusion_and_head_only():
    module = small_module("classification")
    module.train()
    batch = {"image": images(batch=2), "label": torch.tensor([0, 2]), "sample": ["a", "b"]}
    logits = module(batch)
    assert logits.shape == (2, 3)
    loss = module.task_loss(logits, batch["label"]) + module.fusion.aux_loss
    loss.backward()
    assert all(p.grad is not None for p in module.head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.fusion.parameters())
    assert all(p.grad is None for p in module.extractor.parameters())
    assert not module.extractor.training


def test_multilabel_uses_bce_and_f1_at_half():
    module = small_module("multilabel", num_classes=4)
    logits = torch.tensor([[2.0, -2.0, 0.1, -0.1]])
    label = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, label)
    assert torch.allclose(module.task_loss(logits, label), expected)
    metrics = task_metrics("multilabel", 4, None, None)
    metrics.update(logits.sigmoid(), label.long())
    values = metrics.compute()
    # predicted {0, 2}, true {0, 3}: tp 1, fp 1, fn 1 -> micro F1 0.5
    assert torch.isclose(values["f1_micro"], torch.tensor(0.5))


def test_segmentation_miou_uses_one_confusion_matrix_without_ignored_pixels():
    metrics = task_metrics("segmentation", 2, ["land", "water"], ignore_index=255)

    def one_hot_logits(prediction):
        return torch.nn.functional.one_hot(prediction, 2).permute(0, 3, 1, 2).float()

    # batch 1: target [0, 0, 1, 255], prediction [0, 1, 1, 0]; batch 2: target [1, 1], prediction [1, 0]
    metrics.update(one_hot_logits(torch.tensor([[[0, 1, 1, 0]]])), torch.tensor([[[0, 0, 1, 255]]]))
    metrics.update(one_hot_logits(torch.tensor([[[1, 0]]])), torch.tensor([[[1, 1]]]))
    values = metrics.compute()
    # split confusion (ignored pixel dropped): class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1, fn 1 -> 1/2
    assert torch.isclose(values["iou_land"], torch.tensor(1 / 3))
    assert torch.isclose(values["iou_water"], torch.tensor(1 / 2))
    assert torch.isclose(values["miou"], torch.tensor((1 / 3 + 1 / 2) / 2))
    assert torch.isclose(values["pixel_accuracy"], torch.tensor(3 / 5))


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    module = small_module("classification", warmup_epochs=5)
    module.trainer = Trainer(max_epochs=15, logger=False, enable_checkpointing=False)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(16):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(2e-5)
    assert rates[5] == pytest.approx(0.01)
    assert rates[2] == pytest.approx(2e-5 + (0.01 - 2e-5) * 2 / 5)
    assert rates[15] == pytest.approx(1e-5)
    assert all(later <= earlier for earlier, later in zip(rates[5:], rates[6:], strict=False))


def test_task_must_be_known_and_agree_with_the_datamodule():
    module = DiFuserModule(
        tiny_extractor(timesteps=[1], num_inversion_steps=2),
        fusion=partial(GlobalWeightedFusion, out_channels=8, bottleneck_channels=8),
        head=LinearClassificationHead,
        num_classes=3,
    )
    module.configure_model()  # no trainer, incomplete task: waits (load_from_checkpoint fills it)
    with pytest.raises(RuntimeError, match="head is built by configure_model"):
        module({"image": images(batch=1), "sample": ["a"]})
    module.trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False)  # no datamodule
    with pytest.raises(ValueError, match="needs \\['task_type'\\]"):
        module.configure_model()
    with pytest.raises(ValueError, match="num_classes=3 disagrees with the datamodule's 10"):
        module._adopt_task({"num_classes": 10}, "datamodule")


def test_every_task_config_parses_and_a_missing_weights_folder_names_its_key(tmp_path, capsys):
    configs = sorted((CONFIGS.parent / "difuser").glob("*.yaml"))
    assert len(configs) == 12
    for config in configs:
        with pytest.raises(SystemExit) as parsed:
            main(["fit", "--config", str(config), "--print_config"])
        assert parsed.value.code in (0, None), config
    capsys.readouterr()
    root = tmp_path / "geobench"
    write_eurosat(root)
    with pytest.raises(ValueError, match="backbone.init_args.root"):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS.parent / "difuser" / "m-eurosat.yaml"),
                "--data.init_args.root",
                str(root),
                "--model.init_args.extractor.init_args.backbone.init_args.root",
                str(tmp_path / "absent"),
            ]
        )
