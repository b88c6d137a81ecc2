"""Image-text retrieval recall@k, computed in chunks of queries (never the full N x N similarity matrix).

Metric names follow CLIP_benchmark: `image_retrieval_recall@k` is text -> image (is the text's image among the
k most similar images), `text_retrieval_recall@k` is image -> text.
"""

from __future__ import annotations

import torch

from polymodal.data.config import DataConfig
from polymodal.data.pipeline import ShardLoader
from polymodal.distributed import Placement


@torch.no_grad()
def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, query_to_key: torch.Tensor, ks=(1, 5, 10),
                chunk: int = 1024) -> dict[int, float]:
    """Fraction of queries whose matching key (index query_to_key[i]) ranks in the top k, for each k."""
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ keys.T
        target = scores.gather(1, query_to_key[start:start + chunk, None])
        rank = (scores > target).sum(dim=1)  # keys strictly better than the right one
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: hits[k] / len(queries) for k in ks}


@torch.no_grad()
def encode_pairs(model, shards: str, image_size: int, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text embeddings of every (rgb, caption) pair in `shards`, in stream order."""
    cfg = DataConfig(shards=shards, modalities=["rgb", "caption"], batch_size=batch_size, num_workers=0,
                     shuffle_shards=False, shuffle_buffer=0, image_size=image_size, augment=False)
    images, texts = [], []
    for batch in ShardLoader(cfg, tokenizer=model.tokenizer(), where=Placement(0, 1)):
        images.append(model.encode_image(batch["rgb"]).float())
        texts.append(model.encode_text(batch["caption"]).float())
    return torch.cat(images), torch.cat(texts)


def retrieval(model, shards: str, image_size: int, ks=(1, 5, 10)) -> dict[str, float]:
    """One caption per image: pair i is image i with text i."""
    image, text = encode_pairs(model, shards, image_size)
    index = torch.arange(len(image))
    i2t = recall_at_k(image, text, index, ks)
    t2i = recall_at_k(text, image, index, ks)
    out = {f"image_retrieval_recall@{k}": t2i[k] for k in ks}
    out.update({f"text_retrieval_recall@{k}": i2t[k] for k in ks})
    out["pairs"] = len(image)
    return out
