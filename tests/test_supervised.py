"""SupervisedModule and networks.supervised: SatDiFuser's fully supervised ConvNeXt / UNet references."""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import yaml

from datamodules.geobench import GeoBenchDataModule
from datamodules.synthetic.geobench import write_cashew_plant, write_eurosat
from lightning_cli.cli import main
from lightning_modules.supervised import SupervisedModule
from networks.supervised import ConvNeXtClassifier, PerTaskNetwork, UNetSegmenter

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_UNET = {"encoder_name": "tu-resnet10t", "encoder_depth": 3, "decoder_channels": [32, 16, 8]}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to reach the Hugging Face hub fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_networks_build_with_random_weights_and_give_logits_of_the_task_shape():
    classifier = ConvNeXtClassifier(5, 4, model_name="convnext_atto")
    assert classifier(torch.rand(2, 5, 32, 32)).shape == (2, 4)
    segmenter = UNetSegmenter(5, 7, **TINY_UNET)
    assert segmenter(torch.rand(2, 5, 20, 28)).shape == (2, 7, 20, 28)  # not a multiple of the encoder stride
    build = {
        "classification": partial(ConvNeXtClassifier, model_name="convnext_atto"),
        "segmentation": partial(UNetSegmenter, **TINY_UNET),
    }
    assert isinstance(PerTaskNetwork(5, 7, **build, task_type="segmentation").network, UNetSegmenter)
    assert isinstance(PerTaskNetwork(5, 4, **build, task_type="multilabel").network, ConvNeXtClassifier)


def test_local_weights_load_with_the_stem_adapted_to_the_bands_and_a_missing_file_names_its_key(tmp_path):
    source = timm.create_model("convnext_atto", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "convnext.pth")
    classifier = ConvNeXtClassifier(
        5, 4, model_name="convnext_atto", weights_path=str(tmp_path / "convnext.pth")
    )
    loaded = classifier.model.state_dict()
    assert torch.equal(
        loaded["stages.2.blocks.0.conv_dw.weight"], source.state_dict()["stages.2.blocks.0.conv_dw.weight"]
    )
    assert loaded["stem.0.weight"].shape[1] == 5 and loaded["head.fc.weight"].shape[0] == 4
    # timm's adapt_input_conv: the RGB kernels repeated over 5 bands, rescaled by 3/5
    expected = source.stem[0].weight.repeat(1, 2, 1, 1)[:, :5] * 3 / 5
    assert torch.allclose(loaded["stem.0.weight"], expected)

    rgb = UNetSegmenter(3, 7, **TINY_UNET)
    torch.save(rgb.model.encoder.state_dict(), tmp_path / "encoder.pth")
    segmenter = UNetSegmenter(4, 7, **TINY_UNET, encoder_weights_path=str(tmp_path / "encoder.pth"))
    inner = {
        k: v
        for k, v in segmenter.model.encoder.state_dict().items()
        if v.shape == rgb.model.encoder.state_dict()[k].shape
    }
    assert len(inner) == len(rgb.model.encoder.state_dict()) - 1  # all but the first conv, adapted to 4 bands
    assert all(torch.equal(value, rgb.model.encoder.state_dict()[key]) for key, value in inner.items())
    assert segmenter(torch.rand(1, 4, 16, 16)).shape == (1, 7, 16, 16)

    with pytest.raises(FileNotFoundError, match="model.init_args.network.init_args.weights_path"):
        ConvNeXtClassifier(3, 4, model_name="convnext_atto", weights_path=str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="model.init_args.network.init_args.encoder_weights_path"):
        UNetSegmenter(3, 4, **TINY_UNET, encoder_weights_path=str(tmp_path / "absent.pth"))


def geobench_batch(root: Path) -> tuple[GeoBenchDataModule, dict]:
    write_cashew_plant(root)
    datamodule = GeoBenchDataModule(task="m-cashew-plant", root=str(root), batch_size=4)
    datamodule.setup("fit")
    return datamodule, next(iter(datamodule.train_dataloader()))


def test_the_whole_network_trains_on_a_geobench_batch(tmp_path):
    datamodule, batch = geobench_batch(tmp_path / "geobench")
    module = SupervisedModule(
        network=partial(UNetSegmenter, **TINY_UNET),
        in_channels=len(datamodule.band_names),
        num_classes=datamodule.num_classes,
        task_type=datamodule.task_type,
        ignore_index=datamodule.ignore_index,
        init_seed=0,
    )
    assert (batch["label"] == datamodule.ignore_index).any()  # the stray mask value is ignored by the loss
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses, reached = [], set()
    for _ in range(6):
        optimizer.zero_grad()
        loss = module.task_loss(module(batch), batch["label"]) + module.auxiliary_loss()
        loss.backward()
        reached |= {
            name for name, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0]
    # every parameter is trained (timm zero-initialises each block's last norm: its branch learns from step 2)
    assert reached == {name for name, _ in module.named_parameters()}
    first_conv = next(m for m in module.network.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0
    assert first_conv.in_channels == 3  # the datamodule's RGB bands


def test_network_initialisation_follows_the_seed_not_the_global_rng():
    def build(global_seed: int, init_seed: int = 3) -> SupervisedModule:
        torch.manual_seed(global_seed)
        module = SupervisedModule(network=partial(UNetSegmenter, **TINY_UNET), init_seed=init_seed)
        torch.rand(100)  # what a strategy does to the RNG before configure_model
        module._adopt_task({"task_type": "segmentation", "num_classes": 3, "in_channels": 4}, "datamodule")
        module.configure_model()
        return module

    first, second, other = build(0).state_dict(), build(123).state_dict(), build(0, init_seed=4).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_the_overlays_leave_only_supervised_module_keys(capsys):
    """After a task file, also one setting DiFuser keys (m-NeonTree: its 512 px backbone); all 12 checked by hand."""
    for name in ("m-NeonTree", "m-bigearthnet"):
        task = CONFIGS / "difuser" / f"{name}.yaml"
        kind = "seg" if "segmentation" in task.read_text().split("\n")[0] else "cls"
        overlay = "supervised_unet.yaml" if kind == "seg" else "supervised_convnext.yaml"
        configs = [CONFIGS / "difuser" / f"_base_{kind}.yaml", task, CONFIGS / "gfm" / overlay]
        with pytest.raises(SystemExit) as parsed:
            main(["fit", *[arg for path in configs for arg in ("--config", str(path))], "--print_config"])
        assert parsed.value.code in (0, None)
        printed = capsys.readouterr()
        assert "warn" not in printed.err.lower()
        model = yaml.safe_load(printed.out)["model"]
        assert model["class_path"] == "lightning_modules.supervised.SupervisedModule"
        assert set(model["init_args"]) == set(inspect.signature(SupervisedModule).parameters)
        assert model["init_args"]["optimizer"]["init_args"]["lr"] == 0.01  # the paper's, from the base
        assert model["init_args"]["warmup_epochs"] == 5


@pytest.mark.parametrize(
    ("base", "overlay", "write_task", "metric"),
    [
        ("difuser_cls.yaml", "supervised_cls.yaml", write_eurosat, "test/accuracy"),
        ("difuser_seg.yaml", "supervised_seg.yaml", write_cashew_plant, "test/miou"),
        ("difuser_seg.yaml", "supervised.yaml", write_cashew_plant, "test/miou"),  # the tiny table's row
    ],
)
def test_cli_fit_then_test_and_load_from_the_checkpoint_alone(tmp_path, base, overlay, write_task, metric):
    root = tmp_path / "geobench"
    write_task(root)
    args = [
        "--config", str(CONFIGS / "tiny" / base), "--config", str(CONFIGS / "tiny" / overlay),
        "--data.init_args.root", str(root), "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger", "false", "--trainer.max_epochs", "1",
    ]  # fmt: skip
    fit = main(["fit", *args])
    model, datamodule = fit.model, fit.datamodule
    assert model.task["in_channels"] == len(datamodule.band_names)
    assert model.task["ignore_index"] == datamodule.ignore_index  # linked by the CLI
    assert model.task["num_classes"] == datamodule.num_classes
    optimised = {id(p) for group in fit.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.network.parameters()}

    last = next((tmp_path / "run").rglob("last.ckpt"))
    test = main(["test", *args, "--ckpt_path", str(last)])
    assert metric in test.trainer.callback_metrics and "test/loss" in test.trainer.callback_metrics
    reloaded = SupervisedModule.load_from_checkpoint(last)  # network rebuilt from the saved config
    trained = model.state_dict()
    assert reloaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(value, trained[key]) for key, value in reloaded.state_dict().items())
    assert all(torch.equal(value, trained[key]) for key, value in test.model.state_dict().items())
