"""Sat-JEPA-Diff training defects that only show at paper scale, checked on the tiny config's real code paths:
EMA per optimizer step, schedule lengths, per-sample sampling noise, full-grid I-JEPA loss, masked flow
loss, grid checks, SSIM subset, validation subset and the I-JEPA-only mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_cli import main
from lightning_modules.forecast import ForecastModule
from metrics.losses import flow_matching_loss
from networks.adapter import ConditioningAdapter
from networks.ijepa import EMATargetEncoder, EmbeddingProjectionHead, IJEPAPredictor, MultiBlockMaskGenerator

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny" / "forecast.yaml")
TINY_IJEPA_ONLY = str(REPO_ROOT / "configs" / "tiny" / "ijepa_only.yaml")
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]


@pytest.fixture(autouse=True)
def run_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)


def build(*overrides: str, config: str = TINY_CONFIG):
    cli = main(["--config", config, *QUIET, *overrides], run=False)
    return cli.model, cli.datamodule


def quiet_trainer(tmp_path: Path, **kwargs) -> Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "limit_val_batches": 0,
        "default_root_dir": str(tmp_path),
    }
    return Trainer(**{**defaults, **kwargs})


def toy_batch(batch_size: int = 2, size: int = 64, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch_size, 1, 3, size, size, generator=generator)
    return {
        "image": image,
        "target": (image[:, -1] * 0.9 + 0.05).clamp(0, 1),
        "mask": torch.ones(batch_size, size, size, dtype=torch.bool),
        "embedding": torch.randn(batch_size, 64, size, size, generator=generator),
        "has_embedding": torch.ones(batch_size, dtype=torch.bool),
        "region": [f"region{seed}_{i}" for i in range(batch_size)],
        "target_time": ["t1"] * batch_size,
        "transform": [(10.0, 0.0, 1000.0 + 640 * i, 0.0, -10.0, 5000.0) for i in range(batch_size)],
    }


def pick(batch: dict, indices: list[int]) -> dict:
    """A batch made of some samples of ``batch``, in the given order."""
    index = torch.tensor(indices)
    return {k: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in indices] for k, v in batch.items()}


# ----- EMA of the target encoder ---------------------------------------------------------------------------
def test_ema_steps_once_per_optimizer_step_with_gradient_accumulation(tmp_path, monkeypatch):
    module, data = build()
    updates = []
    original = EMATargetEncoder.update
    monkeypatch.setattr(
        EMATargetEncoder, "update", lambda self, *a, **k: (updates.append(1), original(self, *a, **k))
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=4, accumulate_grad_batches=2)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    assert len(updates) == 2


class TargetEncoderAfterStep(Callback):
    """Snapshots the target encoder once step ``step`` is completely over (at the next batch's start)."""

    def __init__(self, step: int):
        self.step, self.state = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.state = {k: v.clone() for k, v in pl_module.target_encoder.state_dict().items()}


def test_checkpoint_saved_at_batch_end_already_holds_that_steps_ema_update(tmp_path):
    module, data = build()
    checkpoints, snapshot = tmp_path / "checkpoints", TargetEncoderAfterStep(step=2)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=2,  # 4 optimizer steps: at step 2 the momentum is below 1, so its EMA update moves weights
        limit_train_batches=2,
        enable_checkpointing=True,
        callbacks=[snapshot, ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=1, save_top_k=-1)],
    )
    trainer.fit(module, datamodule=data)
    saved = torch.load(next(checkpoints.glob("*step=2*.ckpt")), weights_only=False)["state_dict"]
    assert snapshot.state
    for key, value in snapshot.state.items():
        assert torch.equal(saved[f"target_encoder.{key}"], value), key


# ----- schedule lengths ------------------------------------------------------------------------------------
def test_warmup_is_one_epoch_of_optimizer_steps_when_max_steps_caps(tmp_path):
    module, data = build("--model.init_args.warmup_epochs=1")
    trainer = quiet_trainer(
        tmp_path, max_epochs=10, max_steps=3, limit_train_batches=4, accumulate_grad_batches=2
    )
    trainer.fit(module, datamodule=data)
    # 4 batches / 2 accumulated = 2 optimizer steps per epoch; the run is capped at 3 optimizer steps
    assert module.schedule_steps() == (3, 2)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    lr = trainer.optimizers[0].defaults["lr"]
    assert scheduler.lr_lambdas[0](0) * lr == pytest.approx(module.warmup_start_lr)
    assert scheduler.lr_lambdas[0](2) * lr == pytest.approx(lr)


def test_schedules_run_with_max_steps_only(tmp_path):
    module, data = build()
    trainer = quiet_trainer(tmp_path, max_epochs=-1, max_steps=2, limit_train_batches=2)
    trainer.fit(module, datamodule=data)
    assert module.schedule_steps() == (2, 2)
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["weight_decay"] > optimizer.defaults["weight_decay"]


# ----- sampling noise --------------------------------------------------------------------------------------
def validation_forecasts(module: ForecastModule, batch: dict) -> torch.Tensor:
    """The forecasts ForecastTask.validation_step makes for ``batch`` (the path validation and test take)."""
    module.validation_step(batch, 0)
    return module.last_val_images["forecast"]


def test_forecast_of_a_window_does_not_depend_on_its_batch():
    module, _ = build()
    module.eval()
    samples = toy_batch(batch_size=3)
    with torch.no_grad():
        alone = validation_forecasts(module, pick(samples, [0]))
        first = validation_forecasts(module, pick(samples, [0, 1]))
        second = validation_forecasts(module, pick(samples, [2, 0]))
    torch.testing.assert_close(first[0], alone[0], rtol=0, atol=1e-4)  # batched kernels round differently
    torch.testing.assert_close(second[1], alone[0], rtol=0, atol=1e-4)


def test_sampling_noise_differs_between_samples_and_rollout_steps_and_is_seeded():
    from lightning_modules.forecast_task import sample_keys

    module, _ = build()
    batch = toy_batch(batch_size=2)
    batch["image"][1] = batch["image"][0]  # same pixels, different windows
    frame, shape = batch["image"][:, -1], torch.Size([2, 4, 8, 8])
    step_1 = module.sampling_noise(frame, shape, sample_keys(batch, step=1))
    step_2 = module.sampling_noise(frame, shape, sample_keys(batch, step=2))
    assert not torch.equal(step_1[0], step_1[1])
    assert not torch.equal(step_1[0], step_2[0])
    torch.testing.assert_close(module.sampling_noise(frame, shape, sample_keys(batch, step=1)), step_1)
    module.sampling_seed = 1
    assert not torch.equal(module.sampling_noise(frame, shape, sample_keys(batch, step=1)), step_1)


def test_rollout_steps_draw_fresh_noise_per_step():
    module, _ = build()
    module.eval()
    drawn = []
    noise = module.sampling_noise
    module.sampling_noise = lambda frame, shape, keys: (
        drawn.append((keys, noise(frame, shape, keys))),
        drawn[-1][1],
    )[1]
    images = toy_batch(batch_size=1)["image"][:, 0]
    sequence = {
        "images": torch.stack([images, images, images], dim=1),
        "mask": torch.ones(1, 3, 64, 64, dtype=torch.bool),
        "times": [["t0", "t1", "t2"]],
        "region": ["r"],
        "transform": [(10.0, 0.0, 0.0, 0.0, -10.0, 0.0)],
    }
    with torch.no_grad():
        module.rollout(sequence, 0)
    (keys_1, noise_1), (keys_2, noise_2) = drawn
    assert keys_1 == ["r|10.0,0.0,0.0,0.0,-10.0,0.0|t1|1"] and keys_2 == ["r|10.0,0.0,0.0,0.0,-10.0,0.0|t2|2"]
    assert not torch.equal(noise_1, noise_2)


def test_sample_keys_name_region_window_target_time_and_step():
    from lightning_modules.forecast_task import sample_keys

    keys = sample_keys(toy_batch(batch_size=2), step=3)
    assert keys[0] == "region0_0|10.0,0.0,1000.0,0.0,-10.0,5000.0|t1|3"
    assert len(set(keys)) == 2
    assert sample_keys({"image": torch.zeros(1)}) is None


# ----- I-JEPA loss on the full-grid prediction -------------------------------------------------------------
def full_grid_gradient(*overrides: str) -> torch.Tensor:
    module, _ = build("--model.init_args.diffusion_weight=0", *overrides)
    module.train()
    kept = []
    predict = module.predict_semantics

    def keep_grad(frame):
        semantics = predict(frame)
        semantics.retain_grad()
        kept.append(semantics)
        return semantics

    module.predict_semantics = keep_grad
    module.training_step(toy_batch(), 0).backward()
    return kept[0].grad


def test_hybrid_loss_trains_the_full_grid_prediction_the_adapter_consumes():
    gradient = full_grid_gradient()
    assert gradient is not None and gradient.abs().sum() > 0
    switched_off = full_grid_gradient("--model.init_args.full_grid_weight=0")
    assert switched_off is None or switched_off.abs().sum() == 0


# ----- flow-matching MSE on valid latent cells -------------------------------------------------------------
def test_flow_matching_loss_counts_only_valid_latent_cells():
    predicted, target = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    predicted[0, :, 0, 0] = 10.0  # error only in an invalid cell
    predicted[1, :, 1, 1] = 1.0
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[0, 0, 0] = False
    expected = 4 * 1.0 / (4 * (2 * 64 - 1))  # sum of squared errors / (valid cells x channels)
    assert flow_matching_loss(predicted, target, valid).item() == pytest.approx(expected)


def test_diffusion_mse_ignores_nodata_pixels():
    module, _ = build()
    batch = toy_batch()
    batch["mask"][0, :8, :8] = False  # one latent cell (8x8 pixels) of sample 0 has nodata
    batch["mask"][1, 3, 60] = False  # a single nodata pixel spoils its cell too
    validity = module.latent_validity(batch["mask"], torch.zeros(2, 4, 8, 8))
    assert validity.sum() == 2 * 64 - 2 and not validity[0, 0, 0] and not validity[1, 0, 7]

    batch["mask"][:] = False  # nothing valid: no flow-matching target at all
    module.backbone.velocity = lambda noisy, *_: torch.full_like(noisy, 1e3)
    frame = batch["image"][:, -1]
    terms = module.diffusion_terms(frame, module.predict_semantics(frame), batch)
    assert terms["flow"].item() == 0.0


# ----- grids that disagree ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_parts() -> dict:
    """The networks the tiny config builds, to recombine with one mismatched part."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO_ROOT)
        module, _ = build()
    names = ("backbone", "adapter", "encoder", "predictor", "projection_head", "mask_generator")
    return {name: getattr(module, name) for name in names}


@pytest.mark.parametrize(
    "part, message",
    [
        (
            lambda: MultiBlockMaskGenerator(grid_size=4, min_keep=1),
            "mask_generator.init_args.grid_size=4 but the encoder's grid",
        ),
        (
            lambda: IJEPAPredictor(grid_size=4, in_dim=32, width=16, depth=1, num_heads=2, out_dim=32),
            "predictor.init_args.grid_size=4 but the encoder's grid",
        ),
        (
            lambda: ConditioningAdapter(
                semantic_dim=32, semantic_grid=16, hidden_dim=32, joint_dim=32, pooled_dim=16
            ),
            "adapter.init_args.semantic_grid=16 but the encoder's grid",
        ),
        (lambda: EmbeddingProjectionHead(in_dim=16), "projection_head.init_args.in_dim=16 but"),
        (
            lambda: ConditioningAdapter(
                semantic_dim=32, semantic_grid=8, hidden_dim=32, joint_dim=48, pooled_dim=16
            ),
            "adapter.init_args.joint_dim=48 but the transformer's",
        ),
    ],
)
def test_mismatched_grids_and_widths_are_named_at_construction(tiny_parts, part, message):
    wrong = part()
    name = {
        MultiBlockMaskGenerator: "mask_generator",
        IJEPAPredictor: "predictor",
        ConditioningAdapter: "adapter",
        EmbeddingProjectionHead: "projection_head",
    }[type(wrong)]
    with pytest.raises(ValueError, match="mismatched networks") as error:
        ForecastModule(**{**tiny_parts, name: wrong})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_mask_generator_takes_the_encoders_grid():
    module, _ = build()  # the tiny config leaves the mask generator's grid_size to the encoder
    assert module.mask_generator.grid_size == module.encoder.grid_size == 8


def test_data_window_size_must_match_the_encoder(tmp_path):
    """Through the CLI the window size is linked (test_cli.py); a module and datamodule built apart are checked."""
    module, tiny_data = build()
    settings = {key: value for key, value in tiny_data.hparams.items() if not key.startswith("_")}
    data = type(tiny_data)(**{**settings, "patch_size": 128})
    with pytest.raises(ValueError, match=r"data\.init_args\.patch_size=128 .*img_size=64"):
        quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(module, datamodule=data)


# ----- SSIM term on a subset -------------------------------------------------------------------------------
def test_ssim_term_decodes_only_the_configured_subset_and_estimates_the_mean():
    module, _ = build("--model.init_args.ssim_subset=2")
    batch = toy_batch(batch_size=4)
    decoded_sizes = []
    decode = module.backbone.decode
    module.backbone.decode = lambda latents, **kw: (
        decoded_sizes.append(latents.shape[0]),
        decode(latents, **kw),
    )[1]
    noisy = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # 64 px windows, 4x VAE
    velocity, sigmas = torch.zeros_like(noisy), torch.full((4,), 0.3)
    torch.manual_seed(5)
    subset = module.ssim_term(noisy, velocity, sigmas, batch)
    assert decoded_sizes == [2]
    torch.manual_seed(5)
    chosen = torch.randperm(4)[:2].tolist()
    module.ssim_subset = None
    per_sample = torch.stack(
        [module.ssim_term(noisy[[i]], velocity[[i]], sigmas[[i]], pick(batch, [i])) for i in range(4)]
    )
    torch.testing.assert_close(subset, per_sample[chosen].mean())
    # averaged over every subset of two, the estimate is the full batch's mean
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    torch.testing.assert_close(
        torch.stack([per_sample[list(p)].mean() for p in pairs]).mean(), per_sample.mean()
    )


def test_bf16_decode_for_the_ssim_term_stays_close_to_float32():
    module, _ = build()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    full = module.backbone.decode(latents)
    half = module.backbone.decode(latents, autocast_dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.05, rtol=0)


# ----- validation on a seeded subset of windows ------------------------------------------------------------
def validated_windows(tmp_path: Path, max_epochs: int, *overrides: str) -> int:
    module, data = build("--model.init_args.val_subset_windows=1", *overrides)
    counted = []
    forecast = module.forecast
    module.forecast = lambda image, keys=None: (counted.append(image.shape[0]), forecast(image, keys))[1]
    trainer = quiet_trainer(tmp_path, max_epochs=max_epochs, limit_val_batches=3)
    (logged,) = trainer.validate(module, datamodule=data)
    assert torch.isfinite(torch.tensor(logged["val/loss"]))  # the mean over the sampled windows only
    return counted


def test_validation_samples_a_fixed_subset_until_the_last_epoch(tmp_path):
    subset = validated_windows(tmp_path, max_epochs=5)
    assert subset == validated_windows(tmp_path, max_epochs=5)
    everything = validated_windows(tmp_path, max_epochs=1)
    assert everything == [4, 4, 4]
    assert 0 < sum(subset) < 12 and len(subset) < 3  # batches without a sampled window are skipped


# ----- the I-JEPA-only mode --------------------------------------------------------------------------------
def test_ijepa_only_config_loads_no_diffusion_and_tests_embeddings(tmp_path, capsys):
    cli = main(
        [
            "test",
            "--config",
            TINY_IJEPA_ONLY,
            *QUIET,
            "--trainer.limit_test_batches=2",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    module = cli.model
    assert module.backbone is None and module.adapter is None
    assert not any(name.startswith(("backbone.", "adapter.")) for name in module.state_dict())
    logged = cli.trainer.callback_metrics
    assert "test/ijepa/pred_std" in logged  # the demo data has no AlphaEarth embedding: no cosine/L1 there
    _, with_embeddings = module.embedding_metrics(toy_batch())
    assert set(with_embeddings) == {"embedding_cosine", "embedding_l1", "pred_std", "target_std"}
    assert not any(key in logged for key in ("test/ssim", "test/psnr", "test/l1"))
    assert "Sat-JEPA-Diff (I-JEPA only):" in capsys.readouterr().out
    with pytest.raises(ValueError, match="I-JEPA-only"):
        module.forecast(toy_batch()["image"])


# ----- cached target latents -------------------------------------------------------------------------------
def test_latent_cache_encodes_each_window_once_and_matches_a_fresh_encode(tmp_path):
    from networks.sd3 import LatentCache

    module, _ = build(f"--model.init_args.latent_cache.folder={tmp_path / 'latents'}")
    assert isinstance(module.latent_cache, LatentCache)
    batch = toy_batch(batch_size=3)
    encoded = []
    encode = module.backbone.encode
    module.backbone.encode = lambda images: (encoded.append(images.shape[0]), encode(images))[1]
    first = module.target_latents(pick(batch, [0, 1]))
    second = module.target_latents(pick(batch, [2, 1]))
    assert encoded == [2, 1]  # window 1 came from the cache
    torch.testing.assert_close(second[1], first[1], rtol=0, atol=0)
    torch.testing.assert_close(second, encode(pick(batch, [2, 1])["target"]), rtol=0, atol=1e-5)
    module.latent_cache = LatentCache(tmp_path / "latents")  # a new run reads them from disk
    encoded.clear()
    module.target_latents(batch)
    assert encoded == []


def test_paper_losses_overlay_restores_the_papers_objective():
    overlay = str(REPO_ROOT / "configs" / "ablations" / "paper_losses.yaml")
    module, _ = build("--config", overlay)
    assert module.full_grid_weight == 0.0 and module.ssim_subset is None
    default, _ = build()
    assert default.full_grid_weight == 1.0 and default.ssim_subset == 2


@pytest.mark.parametrize(
    "configs, expected",
    [
        (["forecast.yaml"], "ssim_subset: 2"),
        (["bench/forecast_sd35m_random.yaml"], "ssim_subset: 2"),
        (["forecast.yaml", "ablations/paper_losses.yaml"], "full_grid_weight: 0.0"),
        (["ijepa_only.yaml"], "train_diffusion: false"),
    ],
)
def test_real_size_configs_parse(configs, expected, capsys):
    """Parsed (not built: SD3.5 weights are not on this machine) with every key the module accepts."""
    args = [item for name in configs for item in ("--config", str(REPO_ROOT / "configs" / name))]
    with pytest.raises(SystemExit) as exited:
        main(["fit", *args, "--print_config"])
    assert exited.value.code in (0, None)
    printed = capsys.readouterr().out
    assert expected in printed
    if configs == ["ijepa_only.yaml"]:
        assert "backbone: null" in printed and "adapter: null" in printed
