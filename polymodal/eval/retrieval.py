"""Image-text retrieval recall@k, computed in chunks of queries (never the full N x N similarity matrix).

Metric names follow CLIP_benchmark: `image_retrieval_recall@k` is text -> image (is the text's image among the
k most similar images), `text_retrieval_recall@k` is image -> text.
"""

from __future__ import annotations

import torch



@torch.no_grad()
def recall_at_k(queries: torch.Tensor, query_groups: torch.Tensor, keys: torch.Tensor, key_groups: torch.Tensor,
                ks=(1, 5, 10), chunk: int = 1024) -> dict[int, float]:
    """Fraction of queries with a matching key (same group id) among the k most similar keys, for each k.

    A query's rank is the number of keys scoring strictly above its best matching key. Only `chunk` rows of the
    query x key similarities exist at a time.
    """
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ keys.T
        match = query_groups[start:start + chunk, None] == key_groups[None, :]
        best = scores.masked_fill(~match, float("-inf")).amax(dim=1, keepdim=True)
        rank = (scores > best).sum(dim=1)
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: hits[k] / len(queries) for k in ks}


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, text_to_image: torch.Tensor,
                      ks=(1, 5, 10)) -> dict[str, float]:
    """CLIP_benchmark's retrieval metrics; several captions per image allowed (text_to_image maps each text
    to its image). image->text counts an image as found when any of its captions is in the top k."""
    images = torch.arange(len(image))
    t2i = recall_at_k(text, text_to_image, image, images, ks)
    i2t = recall_at_k(image, images, text, text_to_image, ks)
    out = {f"image_retrieval_recall@{k}": t2i[k] for k in ks}
    out.update({f"text_retrieval_recall@{k}": i2t[k] for k in ks})
    return out
