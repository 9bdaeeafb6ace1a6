"""Training operations on the real modules: exact mid-epoch resume (tiny SimVP, with EMA) and bf16-mixed on CPU."""

from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
import yaml

from lightning_cli import main
from tests.conftest import REPO_ROOT

TINY = REPO_ROOT / "configs" / "tiny"
DEMO_DATA = REPO_ROOT / "data" / "demo"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
QUIET += ["--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0"]


def _simvp_args(root: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(TINY / "simvp.yaml"),
        "--data.init_args.root",
        str(DEMO_DATA),
        "--trainer.default_root_dir",
        str(root),
        *QUIET,
        *extra,
    ]


def _last(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_simvp_mid_epoch_resume_matches_uninterrupted_run(tmp_path, num_workers):
    # Random training crops (loaded in workers, or in the process) and the data order must not depend on the restart;
    # the EMA state and AdamW moments must carry over too.
    operations = tmp_path / "operations.yaml"
    operations.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "max_epochs": 2,
                    "limit_train_batches": 4,
                    "limit_val_batches": 1,
                    "deterministic": True,
                    "callbacks": [
                        {"class_path": "callbacks.TrainableEMA", "init_args": {"decay": 0.9}},
                        {"class_path": "callbacks.LastCheckpoint", "init_args": {"every_n_train_steps": 3}},
                    ],
                },
                "data": {"init_args": {"num_workers": num_workers}},
            }
        )
    )
    reference_root, resumed_root = tmp_path / "reference", tmp_path / "resumed"
    main(["fit", *_simvp_args(reference_root, "--config", str(operations))])
    main(["fit", *_simvp_args(resumed_root, "--config", str(operations), "--trainer.max_steps", "3")])
    assert _last(resumed_root)["global_step"] == 3  # stopped mid-epoch 0 (4 batches per epoch)
    torch.manual_seed(123)  # the resumed run must not depend on the process's RNG state
    main(["fit", *_simvp_args(resumed_root, "--config", str(operations), "--ckpt_path", "last")])

    reference, resumed = _last(reference_root), _last(resumed_root)
    assert reference["global_step"] == resumed["global_step"] == 8
    torch.testing.assert_close(resumed["state_dict"], reference["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["ema"], reference["ema"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer_states"], reference["optimizer_states"], rtol=0, atol=0)

    # test --ckpt_path rebuilds SimVP from config + checkpoint alone (default weights_only loading) on EMA weights.
    test = main(["test", *_simvp_args(resumed_root, "--config", str(operations), "--ckpt_path", "last")])
    for name, value in test.model.state_dict().items():
        if name in reference["state_dict"]:
            torch.testing.assert_close(value, reference["state_dict"][name], rtol=0, atol=0)
    assert torch.isfinite(test.trainer.callback_metrics["test/psnr"])


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("simvp.yaml", ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]),
        ("forecast.yaml", ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]),
    ],
)
def test_bf16_mixed_fit_on_cpu(tmp_path, monkeypatch, config, extra):
    monkeypatch.chdir(
        REPO_ROOT
    )  # the tiny forecast config names its tokenizer folder relative to the repository
    args = ["--config", str(TINY / config), "--data.init_args.root", str(DEMO_DATA), *QUIET]
    args += ["--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed", *extra]
    cli = main(["fit", *args, "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.trainer.global_step == int(extra[1])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    checkpoint = _last(tmp_path)
    # Autocast computes in bf16 but the trained weights stay float32.
    assert all(
        value.dtype == torch.float32
        for value in checkpoint["state_dict"].values()
        if value.is_floating_point()
    )


def test_gradient_checkpointing_switch_keeps_loss_and_gradients(monkeypatch):
    from tests.test_forecast_module import build_module, toy_batch

    monkeypatch.chdir(REPO_ROOT)
    real_checkpoint = torch.utils.checkpoint.checkpoint
    checkpointed_functions = []

    def recording_checkpoint(function, *args, **kwargs):
        owner = getattr(function, "__self__", None)  # diffusers passes the block's bound __call__
        checkpointed_functions.append(type(owner).__name__ if owner is not None else function.__qualname__)
        return real_checkpoint(function, *args, **kwargs)

    # diffusers binds torch's checkpoint when enabled (at build time); timm's checkpoint_seq looks it up per call.
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", recording_checkpoint)
    plain = build_module()
    checkpointed = build_module("--model.init_args.gradient_checkpointing=true")
    checkpointed.load_state_dict(plain.state_dict())

    results = []
    for module in (plain, checkpointed):
        module.train()
        torch.manual_seed(0)  # same I-JEPA masks, reference dropout and diffusion noise
        loss = module.training_step(toy_batch(), 0)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (plain_loss, plain_grads), (checkpointed_loss, checkpointed_grads) = results
    # SD3 transformer blocks (diffusers passes the block) and I-JEPA encoder/predictor segments (timm's closure).
    assert "JointTransformerBlock" in checkpointed_functions
    assert sum("checkpoint_seq" in name for name in checkpointed_functions) >= 2
    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=1e-6, atol=1e-7)
    assert set(checkpointed_grads) == set(plain_grads)
    assert any(name.startswith("encoder.") for name in plain_grads)
    torch.testing.assert_close(checkpointed_grads, plain_grads, rtol=1e-4, atol=1e-6)


def test_ema_averages_the_difuser_head_built_in_configure_model(tmp_path):
    # DiFuserModule creates its head in configure_model, after the callbacks' setup: the average must include it.
    from datamodules.synthetic.geobench import write_eurosat

    root = tmp_path / "geobench"
    write_eurosat(root)
    operations = tmp_path / "operations.yaml"
    operations.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "max_steps": 3,
                    "callbacks": [{"class_path": "callbacks.TrainableEMA", "init_args": {"decay": 0.9}}],
                }
            }
        )
    )
    args = ["fit", "--config", str(TINY / "difuser_cls.yaml"), "--config", str(operations), *QUIET]
    args += ["--data.init_args.root", str(root), "--trainer.default_root_dir", str(tmp_path / "run")]
    cli = main(args)
    assert cli.trainer.global_step == 3
    checkpoint = _last(tmp_path / "run")
    trainable = {name for name, p in cli.model.named_parameters() if p.requires_grad}
    assert any(name.startswith("head.") for name in trainable)
    assert set(checkpoint["ema"]["weights"]) == trainable
    assert not torch.equal(
        checkpoint["state_dict"]["head.classifier.weight"],
        checkpoint["ema"]["weights"]["head.classifier.weight"],
    )
