"""Image-text retrieval recall@k, computed in chunks of queries (never the full N x N similarity matrix).

Metric names follow CLIP_benchmark: `image_retrieval_recall@k` is text -> image (is the text's image among the
k most similar images), `text_retrieval_recall@k` is image -> text.

Ties count against the model. A query's rank is the number of non-matching keys scoring at least as high as its
best matching key, and it is a hit at k when that rank is below k: among equal scores the matching keys come last.
CLIP_benchmark takes `torch.topk` of the scores, which orders tied keys however the kernel happens to; this is the
pessimistic, deterministic reading of that top-k, and where nothing ties it is the same figure. Ties come from
identical embeddings: a collapsed model (every embedding equal) scores 0 at every k up to the number of other keys,
not 100 %, and an image whose caption is word for word another image's caption shares its place with that caption.
Identical keys are scored once (see `retrieval_ranks`), so they tie whatever the matrix kernel rounds. A query with
no matching key, or a NaN score for its matches, is a miss; a non-matching key's NaN score counts as a tie.
"""

from __future__ import annotations

import torch

UNMATCHED = torch.iinfo(torch.int64).max  # the rank of a query with no matching key: a miss at every k


@torch.no_grad()
def retrieval_ranks(queries: torch.Tensor, query_groups: torch.Tensor, keys: torch.Tensor, key_groups: torch.Tensor,
                    chunk: int = 1024) -> torch.Tensor:
    """Per query (int64 [len(queries)]): the number of non-matching keys (another group id) scoring at least as
    high as the best matching key (same group id); UNMATCHED (never below any k) for a query that cannot be
    matched (no key of its group, or a NaN score). Only `chunk` rows of the query x key similarities exist at a
    time."""
    # Identical keys must score identically, and a matrix product does not promise that: the same dot product can
    # round differently in another column (another kernel path). So each distinct key is scored once and its score
    # copied to its duplicates (a collapsed model's keys, or one caption embedded for two images, tie exactly).
    distinct, copies = torch.unique(keys, dim=0, return_inverse=True)
    ranks = []
    for start in range(0, len(queries), chunk):
        scores = (queries[start:start + chunk] @ distinct.T)[:, copies]
        match = query_groups[start:start + chunk, None] == key_groups[None, :]
        best = scores.masked_fill(~match, float("-inf")).amax(dim=1, keepdim=True)
        # `not below` rather than `>=`: a NaN score of a non-matching key counts against the query too.
        rank = (~(scores < best) & ~match).sum(dim=1)
        unmatched = ~match.any(dim=1) | best.squeeze(1).isnan()
        ranks.append(rank.masked_fill(unmatched, UNMATCHED))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def recall_at_k(queries: torch.Tensor, query_groups: torch.Tensor, keys: torch.Tensor, key_groups: torch.Tensor,
                ks=(1, 5, 10), chunk: int = 1024) -> dict[int, float]:
    """Fraction of queries with a matching key (same group id) among the k most similar keys, for each k, ties
    broken against the query (see the module docstring)."""
    rank = retrieval_ranks(queries, query_groups, keys, key_groups, chunk)
    return {k: int((rank < k).sum()) / len(queries) for k in ks}


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
