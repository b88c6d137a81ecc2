"""MultiMAE on real CIFAR-10 images: the Dirichlet masking draws exactly its budget and follows alpha, masked
patches never reach the encoder, packed and padded attention give the same losses and gradients, the loss falls,
the rgb path exports to timm with the same features, bad configs name their key, and on the engine a ZeRO-3 + bf16
two-rank run draws, resumes bitwise, exports to timm (evaluated with kNN) and predicts one modality from another."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from conftest import REPO
from polymodal.data.config import DataConfig
from polymodal.data.errors import ConfigError
from polymodal.data.pipeline import ShardLoader
from polymodal.distributed import Placement
from polymodal.models.multimae import ModalitySpec, MultiMAE
from polymodal.pretrain.config import load_pretrain_config
from polymodal.pretrain.objectives import build_objective
from polymodal.pretrain.objectives.masking import draw_budget, draw_visible
from polymodal.pretrain.objectives.multimae import TIMM_VIT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_MODEL = {"dim": 32, "depth": 2, "heads": 2, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
THREE = {"rgb": {"channels": 3}, "edges": {"derive": "edges", "channels": 1},
         "grey": {"derive": "grey", "channels": 1, "loss": "mse", "standardize": False}}


def multimae(**extra):
    torch.manual_seed(0)
    return build_objective({"name": "multimae", **SMALL_MODEL, "num_visible": 24, "modalities": THREE, **extra})


@pytest.fixture(scope="module")
def batches(cifar_test_shards) -> list[dict]:
    cfg = DataConfig(shards=str(cifar_test_shards / "test" / "0.tar"), modalities=["rgb", "label"], batch_size=16,
                     num_workers=0, shuffle_buffer=0, shuffle_shards=False, image_size=32, augment=False)
    loader = iter(ShardLoader(cfg, where=Placement(0, 1)))
    return [next(loader) for _ in range(4)]


# ------------------------------------------------------------------------------------------------------- masking

def test_masking_draws_exactly_the_budget_and_nothing_of_absent_modalities():
    torch.manual_seed(0)
    segments = [64, 64, 16]
    present = torch.rand(500, 3) < 0.7
    present[:5] = False  # samples with nothing at all
    budget = draw_budget(500, (1, 100), "cpu")
    assert budget.min() >= 1 and budget.max() <= 100 and len(budget.unique()) > 50
    for uniformly in (False, True):
        visible = draw_visible(present, segments, budget, alpha=1.0, sample_modalities_uniformly=uniformly)
        available = (present * torch.tensor(segments)).sum(1)
        assert torch.equal(visible.sum(1), torch.minimum(budget, available))
        for i, part in enumerate(visible.split(segments, 1)):
            assert not part[~present[:, i]].any()  # absent: no token
    # The uniform subset option leaves some samples with a single modality even when all are present.
    everything = torch.ones(500, 3, dtype=torch.bool)
    visible = draw_visible(everything, segments, torch.full((500,), 12), sample_modalities_uniformly=True)
    used = torch.stack([p.any(1) for p in visible.split(segments, 1)], 1).sum(1)
    assert 0.15 < (used == 1).float().mean() < 0.6  # 3 of 7 non-empty subsets are singletons (before rounding)


def shares(alpha: float) -> torch.Tensor:
    torch.manual_seed(1)
    visible = draw_visible(torch.ones(2000, 3, dtype=torch.bool), [64, 64, 64], torch.full((2000,), 48), alpha)
    return torch.stack([p.sum(1) for p in visible.split([64, 64, 64], 1)], 1).float() / 48


def test_masking_follows_alpha():
    even, peaked = shares(100.0), shares(0.1)
    for s in (even, peaked):  # symmetric: each modality gets a third on average
        assert torch.allclose(s.mean(0), torch.full((3,), 1 / 3), atol=0.03)
    # Dirichlet(100): every sample close to an even split; Dirichlet(0.1): most samples given to one modality.
    assert (even.max(1).values < 0.5).float().mean() > 0.95
    assert (peaked.max(1).values > 0.9).float().mean() > 0.6
    assert shares(1.0).max(1).values.mean().item() == pytest.approx(11 / 18, abs=0.03)  # E[max of Dir(1,1,1)]


# ------------------------------------------------------------------------------------------------------- model

def test_masked_patches_never_reach_the_encoder(batches):
    objective = multimae().eval()
    maps, present = objective.prepare(batches[0])
    torch.manual_seed(3)
    visible = objective.draw_visible(present, 64)
    changed = {name: x.clone() for name, x in maps.items()}
    for i, name in enumerate(objective.model.inputs):
        hidden = ~visible[:, i * 64:(i + 1) * 64].view(-1, 1, 8, 8)
        pixels = hidden.repeat_interleave(4, 2).repeat_interleave(4, 3).expand_as(changed[name])
        changed[name][pixels] = torch.randn(int(pixels.sum())) * 5
    assert not torch.equal(changed["rgb"], maps["rgb"])
    for packed in (True, False):
        with torch.no_grad():
            a = objective.model(maps, visible, (), packed)["encoded"]
            b = objective.model(changed, visible, (), packed)["encoded"]
        assert torch.equal(a, b)


def test_packed_and_padded_paths_give_equal_losses_and_gradients(batches):
    results = []
    for packed in (True, False):
        objective = multimae(packed=packed, num_visible=[4, 60])  # counts vary per sample: padding is real
        torch.manual_seed(5)
        out = objective(batches[1])
        out["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in objective.parameters() if p.grad is not None])
        results.append((out, grads))
    (a, ga), (b, gb) = results
    for key in ("loss", "loss_rgb", "loss_edges", "loss_grey"):
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(batches):
    results = []
    for recompute in (False, True):
        objective = multimae(num_visible=[4, 60])
        objective.set_grad_checkpointing(recompute)
        torch.manual_seed(6)
        out = objective(batches[2])
        out["loss"].backward()
        results.append((out["loss"], torch.cat([p.grad.flatten() for p in objective.parameters()
                                                if p.grad is not None])))
    assert torch.equal(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1], atol=1e-7)


def test_loss_falls_on_real_cifar10(batches):
    objective = multimae()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=2e-3)
    losses = []
    for step in range(40):
        out = objective(batches[step % 2])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert sum(losses[-8:]) / 8 < 0.85 * sum(losses[:4]) / 4, losses  # masks differ every step: averages


def test_a_segmentation_map_trains_with_cross_entropy(batches):
    objective = multimae(modalities={"rgb": {"channels": 3}, "seg": {"derive": "fgmask", "classes": 11}})
    out = objective(batches[0])
    # 11 classes at random init: cross-entropy near ln(11).
    assert abs(out["loss_seg"].item() - torch.log(torch.tensor(11.0)).item()) < 0.5
    assert out["visible_rgb"] + out["visible_seg"] == 24


@pytest.mark.parametrize("pool", ["mean", "global"])
def test_the_rgb_path_exports_to_timm_with_the_same_features(batches, pool):
    objective = multimae(eval_pool=pool).eval()
    state, metadata = objective.timm_export(32)
    kwargs = json.loads(metadata["timm.model_kwargs"])
    model = timm.create_model(metadata["timm.model"], pretrained=False, num_classes=10, **kwargs).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    images = objective.normalize(batches[0]["rgb"])
    with torch.no_grad():
        ours = objective.image_features(images)
        theirs = model.forward_head(model.forward_features(images), pre_logits=True)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_a_derived_eval_modality_is_derived_from_the_images_for_features(batches):
    objective = multimae(eval_modality="grey").eval()
    images = objective.normalize(batches[0]["rgb"])
    from polymodal.data import derive

    with torch.no_grad():
        features = objective.image_features(images)
        inputs, visible = objective.shown_alone({"grey": derive.grey(batches[0]["rgb"])})
        encoded = objective.model(inputs, visible)["encoded"].unflatten(0, (len(images), -1))
    assert features.shape == (16, 32) and torch.allclose(features, encoded[:, 1:].mean(1), atol=1e-5)


def test_predict_fills_a_target_from_given_modalities(batches):
    objective = multimae().eval()
    rgb = batches[0]["rgb"][:3]
    from polymodal.data import derive

    out = objective.predict({"edges": derive.edges(rgb) * 255}, ["grey", "rgb"])
    assert out["grey"].shape == (3, 1, 32, 32) and out["rgb"].shape == (3, 3, 32, 32)
    with pytest.raises(ConfigError, match="target 'depth'"):
        objective.predict({"edges": derive.edges(rgb)}, ["depth"])


def test_a_modality_grid_mismatch_is_an_error():
    model = MultiMAE([ModalitySpec("rgb", 3, patch_size=4), ModalitySpec("edges", 1, patch_size=8)], dim=32,
                     depth=1, heads=2, decoder_dim=32, decoder_depth=0, decoder_heads=2)
    with pytest.raises(ValueError, match="'edges' makes a 4x4 token grid"):
        model({"rgb": torch.zeros(1, 3, 32, 32), "edges": torch.zeros(1, 1, 32, 32)})


def test_bad_configs_name_the_key(batches):
    with pytest.raises(ConfigError, match="objective.modalities.nosuch"):
        multimae(modalities={"rgb": {}, "nosuch": {"channels": 1}})
    with pytest.raises(ConfigError, match="objective.modalities.e.derive"):
        multimae(modalities={"rgb": {}, "e": {"derive": "sobel"}})
    with pytest.raises(ConfigError, match="objective.modalities.seg.loss"):
        multimae(modalities={"rgb": {}, "seg": {"derive": "fgmask", "classes": 11, "loss": "l1"}})
    with pytest.raises(ConfigError, match="objective.modalities.rgb.channels"):
        multimae(modalities={"rgb": {"channels": 1}})(batches[0])
    with pytest.raises(ConfigError, match="objective.num_visible"):
        multimae(num_visible=[10, 5])
    with pytest.raises(ConfigError, match="objective.eval_modality"):
        multimae(eval_modality="depth")
    cfg = load_pretrain_config(REPO / "configs" / "multimae-cifar.yaml", ["data.image_size=16"])
    with pytest.raises(ConfigError, match="objective.num_visible.*48 visible tokens leave nothing masked"):
        build_objective(cfg.objective).check_run(cfg, zero_stage=0)  # 3 x 4x4 tokens at 16 px
    cfg = load_pretrain_config(REPO / "configs" / "multimae-cifar.yaml", ["data.image_size=30"])
    with pytest.raises(ConfigError, match="objective.modalities.rgb.patch_size"):
        build_objective(cfg.objective).check_run(cfg, zero_stage=0)
    cfg = load_pretrain_config(REPO / "configs" / "multimae-fmnist.yaml", ["data.modalities=[rgb]"])
    with pytest.raises(ConfigError, match="fgmask paints each image's class: add label"):
        build_objective(cfg.objective)(batches[0] | {"label": None})


def test_a_config_gets_the_modalities_it_lists_and_rgb_alone_by_default():
    cfg = load_pretrain_config(REPO / "configs" / "multimae-fmnist.yaml")
    assert build_objective(cfg.objective).model.inputs == ["grey", "edges", "semseg"]
    assert build_objective({"name": "multimae", **SMALL_MODEL}).model.inputs == ["rgb"]


def test_shipped_configs_build_and_pass_their_checks():
    for name, params in (("multimae-cifar", 3.0e6), ("multimae-fmnist", 1.0e6), ("multimae-vitb", 80e6)):
        cfg = load_pretrain_config(REPO / "configs" / f"{name}.yaml")
        section = cfg.objective
        if name == "multimae-vitb":  # building ViT-B takes seconds: check the schema and the sizes only
            section = {**section, "depth": 1}
        objective = build_objective(section)
        objective.check_run(cfg, zero_stage=0)
        if name != "multimae-vitb":
            assert sum(p.numel() for p in objective.parameters()) > params


# ------------------------------------------------------------------------------------------------------ engine

def test_zero3_bf16_two_ranks_draw_resume_bitwise_export_evaluate_and_predict(cifar_test_shards, tmp_path):
    from test_spark import copy_as_stopped_after_step_2, pictures, polymodal, start_event, step_losses

    config = str(REPO / "configs" / "multimae-cifar.yaml")
    small = [f"objective.{k}={v}" for k, v in SMALL_MODEL.items()] + [
        "data.batch_size=8", "objective.num_visible=24", "log.progress=false", "log.tensorboard=false",
        "data.num_workers=1", f"data.shards={cifar_test_shards / 'test'}"]

    def pretrain(run_dir, *extra):
        polymodal("pretrain", config, f"run_dir={run_dir}", "zero_stage=3", "precision=bf16", "checkpoint.every=2",
                  "checkpoint.keep=5", *small, *extra, ranks=2)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    pretrain(whole, "steps=4", "log.images_every=2")
    start = start_event(whole)
    assert (start["world_size"], start["zero_stage"], start["precision"]) == (2, 3, "bf16")
    assert pictures(whole) == ["step_0000002.png", "step_0000004.png"]
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert all(row["visible_rgb"] + row["visible_edges"] + row["visible_grey"] == 24 for row in rows)

    copy_as_stopped_after_step_2(whole, resumed)
    pretrain(resumed, "steps=4", "resume=latest")
    assert step_losses(resumed) == step_losses(whole) and len(step_losses(whole)) == 4

    polymodal("checkpoint", "export", str(whole), "--format", "timm")
    exported = whole / "timm_backbone.safetensors"
    out = tmp_path / "eval"
    polymodal("eval", "--model", f"timm:{TIMM_VIT}:{exported}", "--dataset", str(cifar_test_shards / "test" / "1.tar"),
              "--train", str(cifar_test_shards / "test" / "2.tar"), "--task", "knn", "--output", str(out), "-q",
              "--no-cache")
    assert 0.1 <= json.loads(next(out.glob("*knn.json")).read_text())["metrics"]["knn_acc1"] <= 1

    from PIL import Image

    edges = tmp_path / "edges.png"
    Image.fromarray((torch.rand(32, 32) > 0.8).numpy().astype("uint8") * 255).save(edges)
    printed = polymodal("predict", str(whole), "--input", f"edges={edges}", "--target", "rgb", "--target", "grey",
                        "-o", str(tmp_path / "prediction.png"))
    assert json.loads(printed.splitlines()[0])["targets"] == ["rgb", "grey"]
    with Image.open(tmp_path / "prediction.png") as picture:
        assert picture.size[0] > 3 * 32  # the input, then two predictions
