"""open_clip towers on our attention (`objective.attention_backend`): the same embeddings, loss and gradients as
the stock towers, on real emoji pairs, with the weights under the same names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.data.errors import ConfigError
from polymodal.pretrain.objectives import build_objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def emoji_batch(data_root):
    rows = [json.loads(line) for line in (data_root / "emoji" / "captions.jsonl").read_text().splitlines()[:12]]
    rgb = np.stack([np.asarray(Image.open(data_root / "emoji" / r["image"]).convert("RGB").resize((64, 64)))
                    for r in rows])
    return {"rgb": torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous(), "names": [r["name"] for r in rows],
            "__key__": [r["image"] for r in rows]}


def pair(backend: str, name: str = "clip"):
    torch.manual_seed(0)
    stock = build_objective({"name": name, "model": "polymodal-tiny-vit"})
    ours = build_objective({"name": name, "model": "polymodal-tiny-vit", "attention_backend": backend})
    ours.load_state_dict(stock.state_dict())  # same names: a stock checkpoint loads as it is
    return stock, ours


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_our_attention_gives_the_stock_embeddings_loss_and_gradients(backend, emoji_batch):
    stock, ours = pair(backend)
    assert list(stock.state_dict()) == list(ours.state_dict())
    swapped = [m for m in ours.modules() if type(m).__name__ == "MultiheadAttention"
               and type(m).__module__.startswith("polymodal")]
    assert len(swapped) >= 4  # the image and the text towers' blocks
    batch = dict(emoji_batch, caption=torch.stack([stock.tokenizer()(n) for n in emoji_batch["names"]]))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(batch["rgb"]), stock.encode_image(batch["rgb"]),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.model.encode_text(batch["caption"]), stock.model.encode_text(batch["caption"]),
                                   atol=1e-5, rtol=1e-5)
    expected, got = stock(batch)["loss"], ours(batch)["loss"]
    expected.backward(), got.backward()
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    for (name, p), q in zip(stock.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_an_unknown_attention_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="objective.attention_backend.*unknown backend 'fast'"):
        build_objective({"name": "clip", "model": "polymodal-tiny-vit", "attention_backend": "fast"})


def test_the_text_towers_additive_causal_mask_becomes_causal_attention(monkeypatch):
    from polymodal.models import open_clip_attention

    calls, real = [], open_clip_attention.attention
    monkeypatch.setattr(open_clip_attention, "attention",
                        lambda *a, **kw: calls.append((kw["causal"], kw["mask"])) or real(*a, **kw))
    _, ours = pair("auto")
    with torch.no_grad():
        ours.model.encode_text(torch.stack([ours.tokenizer()(t) for t in ("a red apple", "hash key")]))
    assert calls and all(causal is True and mask is None for causal, mask in calls)


def test_per_sample_patch_dropout_runs_packed_and_equals_each_sample_alone(emoji_batch):
    torch.manual_seed(0)
    stock = build_objective({"name": "clip", "model": "polymodal-tiny-vit"})
    ours = build_objective({"name": "clip", "model": "polymodal-tiny-vit", "attention_backend": "auto",
                            "patch_dropout": 0.5, "patch_dropout_per_sample": True})
    ours.load_state_dict(stock.state_dict())
    images = ours.normalize_images(emoji_batch["rgb"])
    ours.train()
    torch.manual_seed(3)
    packed = ours.model.visual(images)
    keep = ours.model.visual.patch_dropout.last_keep
    assert keep[:, 0].all() and len(set(keep.sum(1).tolist())) > 3  # samples kept different counts
    visual = stock.model.visual.eval()  # the stock tower, no dropout, each sample's kept tokens alone
    with torch.no_grad():
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], 1) + visual.positional_embedding
        for i in range(len(x)):
            alone = visual.transformer(visual.ln_pre(x[i:i + 1, keep[i]]))
            pooled, _ = visual._pool(alone)
            torch.testing.assert_close(packed[i], (pooled @ visual.proj)[0], atol=2e-5, rtol=1e-4)
    ours.eval()
    with torch.no_grad():  # evaluation keeps every patch, padded as usual
        torch.testing.assert_close(ours.model.visual(images), visual(images), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="patch_dropout_per_sample.*needs attention_backend"):
        build_objective({"name": "clip", "model": "polymodal-tiny-vit", "patch_dropout": 0.5,
                         "patch_dropout_per_sample": True})
