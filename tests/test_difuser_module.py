"""DiFuserModule: CLI fit + test (checkpoint reload) on both tiny configs, frozen parts, losses, metrics, schedule."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import wandb
from lightning.pytorch import Callback, Trainer

from datamodules.geobench import GeoBenchDataModule
from datamodules.synthetic.geobench import write_cashew_plant, write_eurosat
from lightning_cli.cli import main
from lightning_modules.difuser import DiFuserModule
from metrics.geobench import task_metrics
from networks.difuser import (
    GlobalWeightedFusion,
    LinearClassificationHead,
    MoEFusion,
    SingleFeature,
    UPerNetHead,
)
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
    # the default W&B logger (offline): model and datamodule hyperparameters are merged without a clash
    logger = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "satdiff", "offline": True, "save_dir": str(tmp_path / "wandb")},
    }
    wandb.finish()  # no run of an earlier test is reused
    fit = main(["fit", *args, "--trainer.logger", json.dumps(logger)])
    wandb.finish()
    model = fit.model
    assert (tmp_path / "wandb" / "wandb").is_dir()
    assert fit.trainer.logger.experiment.config["ignore_index"] == fit.datamodule.ignore_index
    assert model.task["num_classes"] == fit.datamodule.num_classes  # linked from the datamodule
    assert model.task["task_type"] == fit.datamodule.task_type
    assert fit.trainer.callback_metrics["val/loss"].isfinite()
    # only fusion and head are optimised; the extractor never received a gradient
    optimised = {id(p) for group in fit.trainer.optimizers[0].param_groups for p in group["params"]}
    trainable = {id(p) for p in [*model.fusion.parameters(), *model.head.parameters()]}
    assert optimised == trainable
    assert all(p.grad is None and not p.requires_grad for p in model.extractor.parameters())
    # inverted latents (the default tier) were cached once per train/val sample
    assert len(list(cache.rglob("*-latents-float16/*.safetensors"))) == 5

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


def small_module(task_type: str, num_classes: int = 3, timesteps=(1, 100), **kwargs) -> DiFuserModule:
    kwargs.setdefault("fusion", partial(GlobalWeightedFusion, out_channels=8, bottleneck_channels=8))
    kwargs.setdefault("head", LinearClassificationHead)
    module = DiFuserModule(
        tiny_extractor(timesteps=list(timesteps), num_inversion_steps=4),
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


def test_schedule_warms_up_linearly_then_decays_by_cosine(monkeypatch):
    """The paper's per-epoch values at every epoch boundary of the per-optimizer-step schedule (2 steps/epoch)."""
    monkeypatch.setattr("lightning_modules.base.optimizer_steps", lambda trainer: (2, 30))  # 15 epochs
    module = small_module("classification", warmup_epochs=5)
    module.trainer = Trainer(max_epochs=15, logger=False, enable_checkpointing=False)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(31):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    per_epoch = rates[::2]
    assert per_epoch[0] == pytest.approx(2e-5)
    assert per_epoch[5] == pytest.approx(0.01)
    assert per_epoch[2] == pytest.approx(2e-5 + (0.01 - 2e-5) * 2 / 5)
    assert rates[3] == pytest.approx(2e-5 + (0.01 - 2e-5) * 1.5 / 5)  # between epochs: linear too
    assert per_epoch[10] == pytest.approx(1e-5 + (0.01 - 1e-5) * 0.5)  # half-way down the cosine
    assert per_epoch[15] == pytest.approx(1e-5)
    assert all(later <= earlier for earlier, later in zip(rates[10:], rates[11:], strict=False))


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


DIFUSER_CONFIGS = CONFIGS.parent / "difuser"


def task_config_args(task: Path) -> list[str]:
    """A task file is an overlay on its base: ``--config _base_<kind>.yaml --config <task>.yaml``."""
    kind = "seg" if "segmentation" in task.read_text().split("\n")[0] else "cls"
    return ["--config", str(DIFUSER_CONFIGS / f"_base_{kind}.yaml"), "--config", str(task)]


def test_every_task_config_and_ablation_overlay_parses_and_a_missing_weights_folder_names_its_key(
    tmp_path, capsys
):
    tasks = sorted(DIFUSER_CONFIGS.glob("m-*.yaml"))
    ablations = sorted((DIFUSER_CONFIGS / "ablations").rglob("*.yaml"))
    assert len(tasks) == 12 and len(ablations) == 17
    runs = [task_config_args(task) for task in tasks]
    runs += [[*task_config_args(DIFUSER_CONFIGS / "m-NeonTree.yaml"), "--config", str(a)] for a in ablations]
    for args in runs:
        with pytest.raises(SystemExit) as parsed:
            main(["fit", *args, "--print_config"])
        assert parsed.value.code in (0, None), args
    for path in [*tasks, *ablations, *DIFUSER_CONFIGS.glob("_base_*.yaml"), *CONFIGS.glob("difuser_*.yaml")]:
        assert "/work/" not in path.read_text() and "/tmp/" not in path.read_text(), path  # nothing outside
    capsys.readouterr()
    root = tmp_path / "geobench"
    write_eurosat(root)
    with pytest.raises((ValueError, SystemExit)) as raised:  # the CLI may turn the error into one line
        main(
            [
                "fit",
                *task_config_args(DIFUSER_CONFIGS / "m-eurosat.yaml"),
                "--data.init_args.root",
                str(root),
                "--model.init_args.extractor.init_args.backbone.init_args.root",
                str(tmp_path / "absent"),
                "--trainer.default_root_dir",
                str(tmp_path / "run"),
            ]
        )
    assert "backbone.init_args.root" in str(raised.value) + capsys.readouterr().err


def test_head_and_fusion_initialisation_ignore_the_global_rng_state():
    """What DDP does to the RNG before configure_model must not change the weights a rank starts from."""
    extractor = tiny_extractor(timesteps=[1, 100], num_inversion_steps=4)

    def build(global_seed: int) -> DiFuserModule:
        torch.manual_seed(global_seed)
        module = DiFuserModule(
            extractor,
            fusion=partial(GlobalWeightedFusion, out_channels=8, bottleneck_channels=8),
            head=partial(UPerNetHead, channels=8),
        )  # init_seed unset: the run seed
        torch.rand(1000)  # the strategy moves the RNG between construction and configure_model
        module._adopt_task({"task_type": "segmentation", "num_classes": 3}, "datamodule")
        module.configure_model()
        return module

    first, second = build(0), build(123)
    for part in ("fusion", "head"):
        left, right = getattr(first, part).state_dict(), getattr(second, part).state_dict()
        assert all(torch.equal(left[key], right[key]) for key in left), part


def test_a_task_given_at_construction_builds_the_head_at_once():
    module = DiFuserModule(
        tiny_extractor(timesteps=[1], num_inversion_steps=2),
        fusion=partial(GlobalWeightedFusion, out_channels=8, bottleneck_channels=8),
        head=LinearClassificationHead,
        num_classes=4,
        task_type="classification",
        ignore_index=255,
    )
    assert module.head is not None  # an EMA callback sees every trainable parameter at on_fit_start
    assert not {"num_classes", "task_type", "ignore_index"} & set(module.hparams)


def batches(count: int, size: int = 32) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"image": torch.rand(3, size, size, generator=generator), "label": i % 3, "sample": f"s{i}"}
        for i in range(count)
    ]


def test_moe_warmup_counts_optimizer_steps_under_the_trainer(tmp_path):
    """Three timesteps call the MoE layers three times per step; routing turns sparse after N optimizer steps."""
    module = small_module(
        "classification",
        timesteps=(1, 100, 200),
        fusion=partial(
            MoEFusion, out_channels=8, num_experts=4, top_k=2, dense_warmup_steps=2, bottleneck_channels=8
        ),
        warmup_epochs=0,
    )
    routing = []

    class RecordRouting(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            routing.append(pl_module.fusion.sparse)

    trainer = Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[RecordRouting()], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches(8), batch_size=2))
    assert trainer.global_step == 4
    assert routing == [False, False, True, True]


def test_single_feature_gets_the_extractor_layout_and_names_a_level_it_cannot_serve():
    module = small_module(
        "classification",
        fusion=partial(
            SingleFeature, kind="attn", fallback_kind="resnet_residual", timestep_index=1, out_channels=8
        ),
    )
    layout = module.extractor.block_layout
    assert layout[3] == [("resnet_residual", 0), ("resnet_residual", 1)]  # the coarsest level: no attention
    assert module.fusion.entries[0] == len(layout[0]) + 1  # t=100, first attn after the first ResNet
    assert module({"image": images(batch=2), "sample": ["a", "b"]}).shape == (2, 3)
    with pytest.raises(ValueError, match="level 3 has no attn block 0"):
        small_module("classification", fusion=partial(SingleFeature, kind="attn", out_channels=8))


def test_cache_is_refused_with_random_augmentation(tmp_path):
    class AugmentingGeoBench(GeoBenchDataModule):
        random_augmentation = True

    write_eurosat(tmp_path / "geobench")
    datamodule = AugmentingGeoBench(task="m-eurosat", root=str(tmp_path / "geobench"), image_size=32)
    module = DiFuserModule(
        tiny_extractor(timesteps=[1], num_inversion_steps=2),
        fusion=partial(GlobalWeightedFusion, out_channels=8, bottleneck_channels=8),
        head=LinearClassificationHead,
        cache_dir=str(tmp_path / "cache"),
    )
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="cache_dir.*random augmentation"):
        trainer.fit(module, datamodule=datamodule)


def test_predict_over_every_split_fills_the_cache_ahead_of_training(tmp_path):
    """The documented prefill command: `predict ... --data.init_args.predict_split all` with a cache_dir."""
    root, cache = tmp_path / "geobench", tmp_path / "cache"
    write_eurosat(root)
    main(
        [
            "predict", "--config", str(CONFIGS / "difuser_cls.yaml"),
            "--data.init_args.root", str(root), "--data.init_args.predict_split", "all",
            "--model.init_args.cache_dir", str(cache), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.logger", "false",
        ]
    )  # fmt: skip
    assert len(list(cache.rglob("*-latents-float16/*.safetensors"))) == 6  # train 4 + val 1 + test 1
