"""The SparK objective on real images (CIFAR-10 test, 64 px, so the stride-32 mask is 2x2): the sparse encoder
never lets masked pixels reach visible features and normalises with visible positions only, runs as plain timm
without a mask, exports its backbone to timm, and the loss falls when overfitting one batch."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import REPO
from polymodal.data.config import DataConfig
from polymodal.data.errors import ConfigError
from polymodal.data.pipeline import ShardLoader
from polymodal.distributed import Placement
from polymodal.models.sparse_conv import SparseEncoder, group_norm_visible, upsample_mask
from polymodal.pretrain.objectives import build_objective

MODELS = ["resnet18", "convnext_atto"]
SIZE = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rgb(cifar_test_shards) -> torch.Tensor:
    cfg = DataConfig(shards=str(cifar_test_shards / "test"), modalities=["rgb"], batch_size=4, num_workers=0,
                     shuffle_buffer=0, shuffle_shards=False, image_size=SIZE, augment=False)
    return next(iter(ShardLoader(cfg, where=Placement(0, 1))))["rgb"]


def spark(model: str, **extra):
    torch.manual_seed(0)
    return build_objective({"name": "spark", "model": model, "decoder_width": 64, **extra})


@pytest.mark.parametrize("model", MODELS)
def test_masked_pixels_do_not_reach_visible_features(model, rgb):
    objective = spark(model).train()  # batch statistics: the harder case
    images = objective.normalize(rgb)
    visible = objective.random_visible(len(images), SIZE, SIZE, "cpu", torch.Generator().manual_seed(1))
    pixels = upsample_mask(visible, SIZE, SIZE)
    other = torch.where(pixels, images, images.flip(0) * 3)  # other images' pixels, louder, in masked patches
    with torch.no_grad():
        ours, theirs = objective.encoder(images, visible), objective.encoder(other, visible)
    assert len(ours) == len(objective.encoder.reductions)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        masked = ~upsample_mask(visible, *a.shape[-2:])
        assert not a.masked_select(masked).any() and a.masked_select(~masked).abs().sum() > 0


def test_batch_norm_statistics_count_visible_positions_only(rgb):
    encoder = SparseEncoder("resnet18").train()
    stem, norm = encoder.backbone.model.conv1, encoder.backbone.model.bn1
    images = (rgb.float() - 128) / 64
    visible = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool).expand(len(rgb), 1, 2, 2)
    with torch.no_grad():
        encoder(images, visible)
        convolved = stem(images * upsample_mask(visible, SIZE, SIZE))
    at = upsample_mask(visible, *convolved.shape[-2:])[:, 0]
    visible_mean = convolved.permute(0, 2, 3, 1)[at].mean(dim=0)
    assert not torch.allclose(visible_mean, convolved.mean(dim=(0, 2, 3)), atol=1e-3)  # the zeros would count
    torch.testing.assert_close(norm.running_mean, norm.momentum * visible_mean, rtol=1e-4, atol=1e-6)


def test_group_norm_statistics_count_visible_positions_only(rgb):
    encoder = SparseEncoder("resnet18", norm_layer="groupnorm").train()
    norm = encoder.backbone.model.bn1
    seen = {}
    norm.register_forward_pre_hook(lambda m, args: seen.update(input=args[0].clone()))
    # The norm's output as the next layer receives it (cloned: that ReLU works in place).
    encoder.backbone.model.act1.register_forward_pre_hook(lambda m, args: seen.update(output=args[0].clone()))
    visible = torch.tensor([[1, 1], [0, 1]], dtype=torch.bool).expand(len(rgb), 1, 2, 2)
    with torch.no_grad():
        encoder((rgb.float() - 128) / 64, visible)
        at = upsample_mask(visible, *seen["input"].shape[-2:])[:, 0]
        for x, y, keep in zip(seen["input"], seen["output"], at):
            # One sample's visible positions as a 1-row image: plain group norm over exactly those positions.
            packed = x[:, keep][None, :, :, None]
            expected = F.group_norm(packed, norm.num_groups, norm.weight, norm.bias, norm.eps)
            torch.testing.assert_close(y[:, keep], expected[0, :, :, 0], rtol=1e-4, atol=1e-5)
            assert not y[:, ~keep].any()
        torch.testing.assert_close(group_norm_visible(norm, seen["input"], torch.ones_like(at)[:, None]),
                                   F.group_norm(seen["input"], norm.num_groups, norm.weight, norm.bias, norm.eps),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_without_mask_it_is_timm_and_exports_to_timm(model, rgb, tmp_path):
    from safetensors.torch import save_file

    objective = spark(model)
    objective({"rgb": rgb, "__key__": ["k"] * len(rgb)})  # a masked training call first: nothing may linger
    backbone = objective.backbone_state_dict()

    plain = timm.create_model(model, pretrained=False)
    missing, unexpected = plain.load_state_dict(backbone, strict=False)
    head = plain.pretrained_cfg["classifier"].split(".")[0]  # 'fc' (ResNet), 'head' (ConvNeXt: norm and fc)
    assert missing and not unexpected and all(k.split(".")[0] == head for k in missing), missing
    for key, value in backbone.items():
        assert torch.equal(plain.state_dict()[key], value), key

    # timm's own features_only model (its default FeatureListNet), built from the exported file.
    save_file({k: v.contiguous() for k, v in backbone.items()}, str(tmp_path / "backbone.safetensors"))
    reference = timm.create_model(model, features_only=True, pretrained=True,
                                  pretrained_cfg_overlay={"file": str(tmp_path / "backbone.safetensors")})
    objective.eval()
    reference.eval()
    images = objective.normalize(rgb)
    with torch.no_grad():
        ours, theirs = objective.encoder(images), reference(images)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(objective.image_features(images), theirs[-1].mean(dim=(2, 3)), rtol=0, atol=1e-6)


def test_eval_reads_a_spark_checkpoint(rgb, tmp_path):
    from safetensors.torch import save_file

    from polymodal.eval.encoders import load_encoder

    objective = spark("resnet18")
    section = {"name": "spark", "model": "resnet18", "decoder_width": 64}
    save_file({k: v.contiguous() for k, v in objective.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"polymodal.objective": json.dumps(section), "polymodal.image_size": str(SIZE)})
    encoder = load_encoder(str(tmp_path))
    with torch.no_grad():
        features = encoder.encode_image(rgb, normalize=False)
        expected = objective.eval().image_features(objective.normalize(rgb))
    assert encoder.image_size == SIZE and features.shape == (len(rgb), 512)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)


def test_loss_falls_when_overfitting_one_batch_and_reconstruction_png(rgb, tmp_path):
    from PIL import Image

    objective = spark("resnet18")
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3, weight_decay=0)
    batch = {"rgb": rgb, "__key__": ["k"] * len(rgb)}
    losses = []
    for _ in range(30):
        out = objective(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
        assert float(out["mask_ratio"]) == 0.5  # 2 of the 2x2 patches (0.6 of 4, rounded to whole patches)
    # The decoder starts near the patch mean (loss ~1 under norm_pix_loss) and must learn to do better.
    assert 0.9 < sum(losses[:5]) / 5 < 1.1 and sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5, losses

    path = objective.log_images(batch, tmp_path / "reconstruction.png")
    # One row per image, three columns (input, masked, reconstruction), 2 px grid lines.
    assert Image.open(path).size == (3 * (SIZE + 2) + 2, len(rgb) * (SIZE + 2) + 2)
    assert objective.training


def test_config_errors_name_the_key():
    from polymodal.pretrain.config import load_pretrain_config

    for name in ("spark-resnet18-cifar", "spark-convnext-cifar"):
        cfg = load_pretrain_config(REPO / "configs" / f"{name}.yaml")
        spark(cfg.objective["model"]).check_run(cfg, zero_stage=0)  # the shipped sizes pass
    # The images come at data.image_size: that is the size checked, with at least 2 visible patches.
    cfg = load_pretrain_config(REPO / "configs" / "spark-resnet18-cifar.yaml", ["data.image_size=32"])
    with pytest.raises(ConfigError, match=r"data.image_size.*at least 64 px\), got 32"):
        spark("resnet18").check_run(cfg, zero_stage=0)  # a single patch at stride 32: nothing would stay visible
    with pytest.raises(ConfigError, match="data.image_size.*got 80"):
        spark("resnet18").check_image_size(80)  # not a multiple of the stride
    with pytest.raises(ConfigError, match=r"data.image_size.*at least 96 px\), got 64"):
        spark("resnet18", mask_ratio=0.75).check_image_size(64)  # 2x2 patches, only 1 visible at this ratio
    spark("resnet18").check_image_size(64)  # 2x2 patches, 2 visible at 0.6
    with pytest.raises(ConfigError, match="objective.mask_ratio"):
        spark("resnet18", mask_ratio=1.0)
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        spark("resnet18").set_grad_checkpointing(True)
    with pytest.raises(ConfigError, match="objective.image_size"):
        spark("resnet18", image_size=64)  # the images' size is data.image_size alone


CONFIG = str(REPO / "configs" / "spark-resnet18-cifar.yaml")
# Small runs on CPU: 8 images of 64 px a step, a narrow decoder, no console or TensorBoard output.
SMALL = ["data.batch_size=8", "data.image_size=64", "objective.decoder_width=64",
         "log.progress=false", "log.tensorboard=false", "data.num_workers=1"]


def polymodal(*args: str, ranks: int = 1, cpu: bool = True) -> str:
    """`polymodal ARGS` in a subprocess (under torchrun with `ranks` > 1), on DeepSpeed's CPU accelerator with a
    thread per rank unless `cpu` is False; asserts success and returns stdout."""
    import subprocess
    import sys

    from conftest import polymodal_cmd, subprocess_env

    env = subprocess_env() | ({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"} if cpu else {})
    launch = polymodal_cmd() if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={ranks}", "-m", "polymodal"]
    done = subprocess.run(launch + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def start_event(run_dir) -> dict:
    return next(e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
                if e["event"] == "start")


def step_losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def pictures(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "images").iterdir())


def copy_as_stopped_after_step_2(run_dir, copy) -> None:
    """A copy of a 4-step run with checkpoints at 2 and 4, as if it had stopped after step 2."""
    import shutil

    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000004")
    (copy / "checkpoints" / "latest").write_text("step_00000002")


def assert_loads_into_timm_resnet18(backbone) -> None:
    from safetensors.torch import load_file

    missing, unexpected = timm.create_model("resnet18").load_state_dict(load_file(str(backbone)), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_pretrain_draws_reconstructions_and_exports_a_timm_backbone(cifar_test_shards, tmp_path):
    # The whole path on the engine: a few steps of spark on real CIFAR-10, pictures at intervals, the backbone
    # exported for timm, and that file evaluated by `polymodal eval` as a timm model.
    run_dir = tmp_path / "run"
    polymodal("pretrain", CONFIG, f"run_dir={run_dir}", f"data.shards={cifar_test_shards / 'test' / '0.tar'}",
              "steps=4", "log.images_every=2", "checkpoint.every=0", *SMALL)
    assert pictures(run_dir) == ["step_0000002.png", "step_0000004.png"]
    polymodal("checkpoint", "export", str(run_dir), "--format", "timm")
    backbone = run_dir / "timm_backbone.safetensors"
    assert_loads_into_timm_resnet18(backbone)
    out = tmp_path / "eval"
    polymodal("eval", "--model", f"timm:resnet18:{backbone}", "--image-size", "64", "--dataset",
              str(cifar_test_shards / "test" / "1.tar"), "--train", str(cifar_test_shards / "test" / "2.tar"),
              "--task", "knn", "--output", str(out), "-q", "--no-cache")
    result = json.loads(next(out.glob("*knn.json")).read_text())
    assert 0.1 <= result["metrics"]["knn_acc1"] <= 1


def test_zero3_bf16_on_two_ranks_draws_resumes_exactly_and_exports(cifar_test_shards, tmp_path):
    # SparK on the engine as CLIP runs there: two real ranks (torchrun, gloo), ZeRO-3 (weights partitioned, so the
    # pictures need every rank's part of the forward), bf16, checkpoints; a resumed run repeats the uninterrupted
    # run's losses bitwise (masks come from the checkpointed RNG), and the ZeRO-3 checkpoint exports to timm.
    def pretrain(run_dir, *extra):
        polymodal("pretrain", CONFIG, f"run_dir={run_dir}", f"data.shards={cifar_test_shards / 'test'}",
                  "zero_stage=3", "precision=bf16", "checkpoint.every=2", "checkpoint.keep=5", *SMALL, *extra,
                  ranks=2)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    pretrain(whole, "steps=4", "log.images_every=2")
    start = start_event(whole)
    assert (start["world_size"], start["zero_stage"], start["precision"]) == (2, 3, "bf16")
    assert pictures(whole) == ["step_0000002.png", "step_0000004.png"]
    assert all(0.5 < loss < 1.5 for loss in step_losses(whole).values()), step_losses(whole)

    copy_as_stopped_after_step_2(whole, resumed)
    pretrain(resumed, "steps=4", "resume=latest")
    assert step_losses(resumed) == step_losses(whole) and len(step_losses(whole)) == 4

    polymodal("checkpoint", "export", str(whole), "--format", "timm")
    assert_loads_into_timm_resnet18(whole / "timm_backbone.safetensors")


@pytest.mark.gpu
def test_bf16_on_gpu_trains_and_draws(cifar_test_shards, tmp_path):
    # The GPU path: DeepSpeed bf16 on CUDA (on CPU, bf16 is tested above under ZeRO-3).
    run_dir = tmp_path / "run"
    polymodal("pretrain", CONFIG, f"run_dir={run_dir}", f"data.shards={cifar_test_shards / 'test'}", "steps=20",
              "data.batch_size=32", "precision=bf16", "optim.warmup_steps=2", "log.images_every=10",
              "log.progress=false", "checkpoint.every=0", cpu=False)
    start = start_event(run_dir)
    assert (start["precision"], start["device"]) == ("bf16", "cuda")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows]
    assert sum(losses[-3:]) < sum(losses[:3]) and rows[-1]["skipped_steps"] == 0, losses
    assert pictures(run_dir) == ["step_0000010.png", "step_0000020.png"]
