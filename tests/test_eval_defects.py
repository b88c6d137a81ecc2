"""Issue 14: retrieval ties count against the model, the feature cache keys precision and preprocessing, and the
end-of-training evaluation runs on every rank (2 ranks = 1). Real data, real (tiny, seeded) models."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, subprocess_env
from polymodal.eval.datasets import resolve_dataset
from polymodal.eval.encoders import load_encoder, load_seeded_encoder
from polymodal.eval.features import cache_path, extract_features
from polymodal.eval.retrieval import recall_at_k, retrieval_metrics, retrieval_ranks
from polymodal.eval.tasks import TaskOptions, encode_texts, zeroshot_retrieval

TINY_CLIP = "open_clip:polymodal-tiny-vit"  # random init, seeded: the checks need real images, not skill


def _tiny_clip():
    return load_seeded_encoder(TINY_CLIP, None, 0, "cpu")


def _opts(**kw) -> TaskOptions:
    return TaskOptions(batch_size=128, num_workers=1, progress=False, **kw)


def _emoji_pairs(data_root: Path, out: Path, caption: str, limit: int) -> Path:
    from polymodal.data.sources import SourceOptions, open_source
    from polymodal.data.writer import WriterOptions, write_shards

    source = open_source(str(data_root / "emoji" / "captions.jsonl"), SourceOptions(caption=caption, limit=limit))
    write_shards(source, out, WriterOptions(samples_per_shard=100), show_progress=False)
    return out


def _caption_embeddings(encoder, captions: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every caption line, its embedding (each distinct caption encoded once, as zeroshot_retrieval does: a caption
    is one embedding wherever it occurs) and its image's index."""
    texts, owner = [], []
    for image, caption in enumerate(captions):
        lines = [line.strip() for line in caption.splitlines() if line.strip()]
        texts += lines
        owner += [image] * len(lines)
    distinct = sorted(set(texts))
    embedded = encode_texts(encoder, distinct, _opts())
    return texts, embedded[torch.tensor([distinct.index(t) for t in texts])], torch.tensor(owner)


def _full_scores(queries: torch.Tensor, keys: torch.Tensor) -> np.ndarray:
    """The whole query x key matrix in one product, as CLIP_benchmark computes it, with identical keys given the
    score of their first copy (a matrix kernel may round the same dot product differently in another column)."""
    scores = (queries @ keys.T).numpy()
    _, first, inverse = np.unique(keys.numpy(), axis=0, return_index=True, return_inverse=True)
    return scores[:, first[inverse.reshape(-1)]]


def _reference_ranks(scores: np.ndarray, match: np.ndarray, pessimistic: bool) -> np.ndarray:
    """Full-matrix ranks, written independently of the chunked code: sort every query's keys by descending score,
    ties put non-matching keys first (pessimistic) or matching keys first (the old strict count); the rank is the
    position of the first matching key."""
    out = np.empty(len(scores), dtype=np.int64)
    for q in range(len(scores)):
        tie_order = match[q] if pessimistic else ~match[q]  # False sorts first
        order = np.lexsort((tie_order, -scores[q]))
        out[q] = int(np.flatnonzero(match[q][order])[0])
    return out


# ---------------------------------------------------------------------------------------------- retrieval ties


def test_collapsed_model_gets_no_retrieval_credit(data_root: Path, tmp_path: Path):
    """A real model collapsed (projections zeroed: every image and text embedding is the same zero vector) used to
    score R@k = 100 %; with ties counted against it, it finds nothing at k below the number of other keys."""
    pairs = _emoji_pairs(data_root, tmp_path / "pairs", "{name}\nan emoji of {name} ({subcategory})", 300)
    encoder = _tiny_clip()
    model = encoder.image_fn.owner
    with torch.no_grad():
        model.visual.proj.zero_()
        model.text_projection.zero_()
    dataset = resolve_dataset(str(pairs), cache_dir=tmp_path)
    opts = _opts(cache_dir=str(tmp_path / "features"))
    metrics = zeroshot_retrieval(encoder, dataset, opts)
    feats = extract_features(encoder, dataset.test, opts, captions=True)
    assert feats.image.abs().max() == 0  # collapsed for real
    assert metrics["images"] == 300 and metrics["captions"] == 600
    # text->image: each text's image ties with the 299 others -> rank 299; image->text: 598 other captions tie.
    for k in (1, 5, 10):
        assert metrics[f"image_retrieval_recall@{k}"] == 0.0
        assert metrics[f"text_retrieval_recall@{k}"] == 0.0


def test_constant_embeddings_give_exactly_the_pessimistic_recall(data_root: Path, tmp_path: Path):
    """All keys equal to one real image embedding: a query's rank is the number of other keys, so it is a hit at k
    exactly when there are fewer than k other keys (whatever chunk size)."""
    pairs = _emoji_pairs(data_root, tmp_path / "pairs", "{name}", 100)
    feats = extract_features(_tiny_clip(), str(pairs), _opts())
    row = feats.image[7]
    for n in (1, 6, 40):
        same = row.expand(n, -1).contiguous()
        ids = torch.arange(n)
        for chunk in (1, 4, 1024):
            ranks = retrieval_ranks(same, ids, same, ids, chunk=chunk)
            assert ranks.tolist() == [n - 1] * n
            recall = recall_at_k(same, ids, same, ids, ks=(1, 5, 6, 10), chunk=chunk)
            assert recall == {k: 1.0 if n - 1 < k else 0.0 for k in (1, 5, 6, 10)}
    # Two captions per image, all equal: an image competes with the 2 * (n - 1) captions of the other images.
    n = 6
    metrics = retrieval_metrics(row.expand(n, -1), row.expand(2 * n, -1), torch.arange(n).repeat_interleave(2),
                                ks=(1, 5, 10, 11))
    assert metrics["text_retrieval_recall@10"] == 0.0 and metrics["text_retrieval_recall@11"] == 1.0
    assert metrics["image_retrieval_recall@5"] == 0.0 and metrics["image_retrieval_recall@10"] == 1.0
    # A query with no matching key is a miss even when there are fewer keys than k.
    assert recall_at_k(feats.image[:3], torch.tensor([0, 1, 9]), feats.image[:3], torch.arange(3), ks=(5,)) == \
        {5: pytest.approx(2 / 3)}


def test_duplicate_captions_match_a_full_matrix_reference(data_root: Path, tmp_path: Path):
    """Captions that repeat word for word (the emoji subcategory: 400 images, far fewer distinct captions) tie
    exactly; the chunked ranks equal a full-matrix pessimistic sort, and differ from the old strict count."""
    pairs = _emoji_pairs(data_root, tmp_path / "pairs", "{subcategory}", 400)
    encoder = _tiny_clip()
    dataset = resolve_dataset(str(pairs), cache_dir=tmp_path)
    opts = _opts(cache_dir=str(tmp_path / "features"))
    metrics = zeroshot_retrieval(encoder, dataset, opts)
    feats = extract_features(encoder, dataset.test, opts, captions=True)
    texts, text, owner = _caption_embeddings(encoder, feats.captions)
    assert len(set(texts)) < 100 and len(texts) == 400
    scores = _full_scores(feats.image, text)  # image -> text
    match = owner.numpy()[None, :] == np.arange(400)[:, None]
    pessimistic = _reference_ranks(scores, match, pessimistic=True)
    strict = _reference_ranks(scores, match, pessimistic=False)
    assert (pessimistic > strict).sum() > 50  # ties are common here, and the rule decides them
    for chunk in (7, 1024):
        ours = retrieval_ranks(feats.image, torch.arange(400), text, owner, chunk=chunk).numpy()
        np.testing.assert_array_equal(ours, pessimistic)
    t2i = _reference_ranks(_full_scores(text, feats.image), match.T, pessimistic=True)
    for k in (1, 5, 10):
        assert metrics[f"text_retrieval_recall@{k}"] == (pessimistic < k).mean()
        assert metrics[f"image_retrieval_recall@{k}"] == (t2i < k).mean()
    assert metrics["text_retrieval_recall@10"] < (strict < 10).mean()  # the old count inflated it


def test_figures_without_ties_are_unchanged(emoji_shards: Path, tmp_path: Path):
    """All 1,911 emoji pairs (captions = Unicode names): where no non-matching key ties the best match, the rank
    is the old strict one, so a real model's figures only move by the queries that do tie (and never up)."""
    encoder = _tiny_clip()
    dataset = resolve_dataset(str(emoji_shards), cache_dir=tmp_path)
    opts = _opts(cache_dir=str(tmp_path / "features"))
    metrics = zeroshot_retrieval(encoder, dataset, opts)
    feats = extract_features(encoder, dataset.test, opts, captions=True)
    texts, text, owner = _caption_embeddings(encoder, feats.captions)
    n = len(feats.image)
    assert n == 1911 == len(texts)
    match = owner.numpy()[:, None] == np.arange(n)[None, :]
    for direction, s, m in (("image_retrieval", _full_scores(text, feats.image), match),
                            ("text_retrieval", _full_scores(feats.image, text), match.T)):
        best = np.where(m, s, -np.inf).max(axis=1, keepdims=True)
        tied = ((s == best) & ~m).any(axis=1)
        strict = _reference_ranks(s, m, pessimistic=False)
        pessimistic = _reference_ranks(s, m, pessimistic=True)
        np.testing.assert_array_equal(strict[~tied], pessimistic[~tied])
        # A few: 25 emoji share their picture with another (France and St. Martin fly one flag), 2 share a name.
        assert tied.sum() < n / 20, direction
        for k in (1, 5, 10):
            assert metrics[f"{direction}_recall@{k}"] == (pessimistic < k).mean()
            changed = ((strict < k) != (pessimistic < k)).sum()
            assert changed <= tied.sum()
            assert metrics[f"{direction}_recall@{k}"] == pytest.approx((strict < k).mean() - changed / n, abs=1e-12)
    assert metrics["image_retrieval_recall@10"] > metrics["image_retrieval_recall@1"]


# ------------------------------------------------------------------------------------------------ feature cache


def test_feature_cache_keys_precision_and_preprocessing(data_root: Path, tmp_path: Path):
    """bf16 then fp32 with one cache folder: two cache files, and fp32 is served fp32 features."""
    encoder = _tiny_clip()
    pairs = _emoji_pairs(data_root, tmp_path / "pairs", "{name}", 200)
    dataset = resolve_dataset(str(pairs), cache_dir=tmp_path)
    cache = tmp_path / "features"
    bf16 = _opts(cache_dir=str(cache), model_id="tiny", precision="bf16")
    fp32 = _opts(cache_dir=str(cache), model_id="tiny", precision="fp32")
    zeroshot_retrieval(encoder, dataset, bf16)
    cached_fp32 = zeroshot_retrieval(encoder, dataset, fp32)
    files = sorted(cache.glob("features-*.pt"))
    assert len(files) == 2
    pre, what = encoder.preprocessing(), ["rgb", "captions"]  # what tasks._features reads with the images
    bf16_file = cache_path(cache, "tiny", dataset.test, what, pre, bf16)
    fp32_file = cache_path(cache, "tiny", dataset.test, what, pre, fp32)
    assert sorted([bf16_file, fp32_file]) == files
    uncached = extract_features(encoder, dataset.test, _opts(), captions=True)
    stored = torch.load(fp32_file, weights_only=False)
    assert torch.equal(stored["image"], uncached.image) and stored["captions"] == uncached.captions
    assert not torch.allclose(torch.load(bf16_file, weights_only=False)["image"], uncached.image, atol=1e-4)
    # Served from the cache, fp32 gives the figures of fp32 features.
    with torch.no_grad():
        text = encoder.encode_text(torch.stack([encoder.tokenizer()(c) for c in uncached.captions]))
    assert cached_fp32 == {**retrieval_metrics(uncached.image, text, torch.arange(200)), "images": 200, "captions": 200}
    # Everything in the encoder that changes the features changes the key.
    keys = {fp32_file}
    encoder.image_size = 32
    keys.add(cache_path(cache, "tiny", dataset.test, what, encoder.preprocessing(), fp32))
    encoder.mean.add_(1.0)
    keys.add(cache_path(cache, "tiny", dataset.test, what, encoder.preprocessing(), fp32))
    encoder.std.mul_(2.0)
    keys.add(cache_path(cache, "tiny", dataset.test, what, encoder.preprocessing(), fp32))
    encoder.half()
    keys.add(cache_path(cache, "tiny", dataset.test, what, encoder.preprocessing(), fp32))
    assert len(keys) == 5
    assert load_encoder(TINY_CLIP).preprocessing() == pre  # a fresh load keys the same: the cache is reused


# ---------------------------------------------------------------------------------- end-of-training evaluation


def _image_folder(data_root: Path, out: Path, per_class: int) -> Path:
    """A raw source: CIFAR-10 test JPEGs in class subfolders (converted into shards when resolved)."""
    counts: dict[str, int] = {}
    with tarfile.open(data_root / "cifar10" / "test.tar.gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 2:
                continue
            label = parts[-2]
            if counts.get(label, 0) >= per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            (out / label).mkdir(parents=True, exist_ok=True)
            (out / label / parts[-1]).write_bytes(tar.extractfile(member).read())
    assert len(counts) == 10
    return out


def test_held_out_evaluation_two_ranks_equal_one(data_root: Path, cifar_test_shards: Path, tmp_path: Path):
    from polymodal.eval.training_eval import evaluate_held_out

    pairs = str(_emoji_pairs(data_root, tmp_path / "pairs", "{name}\nan emoji of {name} ({subcategory})", 300))
    folder = str(_image_folder(data_root, tmp_path / "folder", 20))
    cifar = str(cifar_test_shards / "test" / "0.tar")
    retrieval, zeroshot = [pairs], [cifar, folder]

    one = evaluate_held_out(_tiny_clip(), retrieval, zeroshot, _opts(), dataset_cache=tmp_path / "cache1")
    assert set(one.metrics) == {"retrieval", f"zeroshot:{cifar}", f"zeroshot:{folder}"}
    assert one.metrics["retrieval"]["images"] == 300 and one.metrics["retrieval"]["captions"] == 600
    assert one.metrics[f"zeroshot:{cifar}"]["samples"] == 1000 and one.metrics[f"zeroshot:{folder}"]["samples"] == 200
    # The same tasks run directly give the same figures.
    direct = zeroshot_retrieval(_tiny_clip(), resolve_dataset(pairs, cache_dir=tmp_path), _opts())
    assert direct == one.metrics["retrieval"]
    assert one.lines[0] == f"retrieval on 300 held-out pairs ({pairs}):"
    r1 = 100 * one.metrics["retrieval"]["image_retrieval_recall@1"]
    assert one.lines[2].startswith("text->image") and f"{r1:.1f}%" in one.lines[2]
    assert len(one.lines) == 4 + 1 + 2  # retrieval: title, header, 2 directions; zero-shot: header, 2 sets

    driver = [str(REPO / "tests" / "held_out_eval.py")]
    args = [str(tmp_path / "cache2")] + [a for p in retrieval for a in ("--retrieval", p)] + \
        [a for z in zeroshot for a in ("--zeroshot", z)]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *driver,
           str(tmp_path / "two.json"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["lines"] == ranks[1]["lines"]
    two = ranks[0]["metrics"]
    assert two.keys() == one.metrics.keys()
    for name, metrics in one.metrics.items():
        assert two[name].keys() == metrics.keys()
        for key, value in metrics.items():
            assert two[name][key] == pytest.approx(value, abs=1e-3), (name, key)
    # Rank 0 converted the raw image folder once; the other rank read it.
    assert len([p for p in (tmp_path / "cache2").iterdir() if p.is_dir()]) == 1
