"""Sat-JEPA-Diff's appendix ablations as overlays: each stacks on its base config and changes only what it says."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest
import torch
import yaml

from lightning_cli import main
from lightning_cli.experiments import load_table, missing_configs
from lightning_cli.resources import config_dir
from lightning_modules.forecast import EMBEDDING_METRICS
from metrics.losses import HybridIJEPALoss
from networks.flow_matching import FlowMatching

CONFIGS = config_dir()
LOSS_TERMS = ("l1", "cosine", "spatial", "contrastive", "feature")
DROPPED = {  # the assumption stated in each overlay's header
    "a": {"cosine", "spatial", "contrastive"},
    "b": {"spatial", "contrastive"},
    "c": {"spatial"},
    "d": {"contrastive"},
}


def printed_config(capsys, *configs: str) -> dict:
    args = [arg for config in configs for arg in ("--config", str(CONFIGS / config))]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def differences(base, other, prefix: str = "") -> dict[str, tuple]:
    """Every dotted key whose value differs between two nested dicts -> (base value, other value)."""
    if isinstance(base, dict) and isinstance(other, dict):
        found = {}
        for key in base.keys() | other.keys():
            found.update(differences(base.get(key), other.get(key), f"{prefix}{key}."))
        return found
    return {} if base == other else {prefix.rstrip("."): (base, other)}


@pytest.fixture(scope="module")
def base_configs():
    """The printed base configs, parsed once (capsys and monkeypatch are per test, so set them by hand)."""
    parsed = {}
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        for name in ("ijepa_only.yaml", "forecast.yaml"):
            stream = io.StringIO()
            with contextlib.redirect_stdout(stream), pytest.raises(SystemExit):
                main(["fit", "--config", str(CONFIGS / name), "--print_config"])
            parsed[name] = yaml.safe_load(stream.getvalue())
    finally:
        sys.argv = argv
    return parsed


@pytest.mark.parametrize("curve", sorted(DROPPED))
def test_loss_ablation_overlay_zeroes_only_its_terms_and_they_leave_the_loss(curve, capsys, base_configs):
    stacked = printed_config(capsys, "ijepa_only.yaml", f"ablations/ijepa_loss/{curve}.yaml")
    loss_key = "model.init_args.ijepa_loss.init_args."
    expected = {"trainer.max_epochs": (100, 20)}
    full_weights = base_configs["ijepa_only.yaml"]["model"]["init_args"]["ijepa_loss"]["init_args"]
    for term in DROPPED[curve]:
        expected[f"{loss_key}{term}_weight"] = (full_weights[f"{term}_weight"], 0.0)
    assert differences(base_configs["ijepa_only.yaml"], stacked) == expected

    ablated = HybridIJEPALoss(**stacked["model"]["init_args"]["ijepa_loss"]["init_args"])
    full = HybridIJEPALoss(**full_weights)
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 6, 8, generator=generator, requires_grad=True)
    inputs = (torch.randn(4, 6, 8, generator=generator), torch.ones(4, dtype=torch.bool))
    features = (torch.randn(4, 6, 16, generator=generator), torch.randn(4, 6, 16, generator=generator))
    terms = ablated(pred, *inputs, *features)
    full_terms = full(pred, *inputs, *features)
    assert all(float(terms[term].detach()) > 0 for term in LOSS_TERMS)  # a dropped term would count here
    kept = [term for term in LOSS_TERMS if term not in DROPPED[curve]]
    torch.testing.assert_close(terms["total"], sum(full.weights[term] * terms[term] for term in kept))
    assert not torch.allclose(terms["total"], full_terms["total"])
    # The gradient is that of the kept terms alone: the dropped ones do not steer the prediction.
    (grad,) = torch.autograd.grad(terms["total"], pred)
    (kept_grad,) = torch.autograd.grad(sum(full.weights[t] * full_terms[t] for t in kept), pred)
    torch.testing.assert_close(grad, kept_grad)


def test_single_step_overlay_samples_with_one_euler_step(capsys, base_configs):
    stacked = printed_config(capsys, "forecast.yaml", "ablations/single_step.yaml")
    key = "model.init_args.flow_matching.init_args."
    assert differences(base_configs["forecast.yaml"], stacked) == {f"{key}num_steps": (20, 1)}
    sampler = FlowMatching(**stacked["model"]["init_args"]["flow_matching"]["init_args"])
    levels = []

    def velocity(latents, sigmas):
        levels.append(sigmas.tolist())
        return torch.zeros_like(latents)

    start = torch.zeros(2, 4, 2, 2)
    sampler.img2img(velocity, start, torch.ones_like(start))
    assert levels == [pytest.approx([0.35, 0.35])]


def test_panopticon_overlay_swaps_only_the_encoder(capsys, base_configs):
    stacked = printed_config(capsys, "forecast.yaml", "ablations/panopticon_encoder.yaml")
    changed = differences(base_configs["forecast.yaml"], stacked)
    assert all(key.startswith("model.init_args.encoder.") for key in changed)
    encoder = stacked["model"]["init_args"]["encoder"]
    assert encoder["class_path"] == "networks.panopticon.PanopticonEncoder"
    assert (
        encoder["init_args"]["grid_size"]
        == stacked["model"]["init_args"]["predictor"]["init_args"]["grid_size"]
    )
    assert (
        encoder["init_args"]["embed_dim"] == stacked["model"]["init_args"]["predictor"]["init_args"]["in_dim"]
    )


def test_ablation_tables_name_existing_configs_and_logged_metrics():
    loss_table = load_table("satjepadiff_ijepa_loss_ablation")
    assert [row.label[0] for row in loss_table.rows] == list("ABCDE")
    assert all(not missing_configs(loss_table, row) for row in loss_table.rows)
    assert {column.metric for column in loss_table.columns} == {
        f"test/ijepa/{name}" for name in EMBEDDING_METRICS
    }
    table1 = load_table("satjepadiff_table1")
    (single_step,) = [row for row in table1.rows if "ablations/single_step.yaml" in row.configs]
    assert single_step.configs == ("forecast.yaml", "ablations/single_step.yaml")
    assert "single-step" in single_step.label
