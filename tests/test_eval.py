"""`polymodal eval` on real data: metric definitions against independent references (CLIP_benchmark's semantics,
scikit-learn), several captions per image, image-only models, the output files, 1 rank = 2 ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from conftest import REPO, polymodal_cmd, subprocess_env
from polymodal.data.errors import ConfigError
from polymodal.eval.datasets import resolve_dataset
from polymodal.eval.encoders import load_encoder
from polymodal.eval.features import extract_features
from polymodal.eval.tasks import TaskOptions, class_embeddings, zeroshot_classification, zeroshot_retrieval

TINY_CLIP = "open_clip:polymodal-tiny-vit"  # random init (seeded below): metric checks need real images, not skill


def _tiny_clip():
    torch.manual_seed(0)
    return load_encoder(TINY_CLIP)


def _opts(tmp_path: Path | None = None) -> TaskOptions:
    return TaskOptions(batch_size=128, num_workers=1, progress=False,
                       cache_dir=str(tmp_path / "features") if tmp_path else None)


def test_zeroshot_classification_matches_reference(cifar_test_shards: Path, tmp_path: Path):
    encoder = _tiny_clip()
    dataset = resolve_dataset(str(cifar_test_shards / "test" / "{0..1}.tar"), cache_dir=tmp_path)
    assert dataset.classnames[:2] == ["airplane", "automobile"] and len(dataset.templates) > 1
    opts = _opts()
    metrics = zeroshot_classification(encoder, dataset, opts)
    # Reference, CLIP_benchmark's recipe written out: mean of normalised prompt embeddings, renormalised; logits
    # 100 * image @ classes; top-k by sorting; mean per-class recall = sklearn's balanced accuracy.
    tokenize = encoder.tokenizer()
    with torch.no_grad():
        rows = []
        for name in dataset.classnames:
            tokens = torch.stack([tokenize(t.replace("{c}", name)) for t in dataset.templates])
            emb = encoder.encode_text(tokens)
            rows.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
        classes = torch.stack(rows)
    assert torch.allclose(classes, class_embeddings(encoder, dataset.classnames, dataset.templates, opts), atol=1e-5)
    feats = extract_features(encoder, dataset.test, opts, labels=True)
    logits = (100 * feats.image @ classes.T).numpy()
    labels = feats.labels.numpy()
    order = np.argsort(-logits, axis=1)
    assert len(labels) == metrics["samples"] == 2000
    assert metrics["acc1"] == pytest.approx(float((order[:, 0] == labels).mean()), abs=1e-3)
    assert metrics["acc5"] == pytest.approx(float((order[:, :5] == labels[:, None]).any(1).mean()), abs=1e-3)
    assert metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, order[:, 0]), abs=1e-3)


def test_retrieval_with_several_captions_matches_reference(data_root: Path, tmp_path: Path):
    """Two captions per image (newline-separated, CLIP_benchmark's convention), held-out emoji pairs."""
    from polymodal.data.sources import SourceOptions, open_source
    from polymodal.data.writer import WriterOptions, write_shards

    source = open_source(str(data_root / "emoji" / "captions.jsonl"),
                         SourceOptions(caption="{name}\nan emoji of {name} ({subcategory})", limit=300))
    write_shards(source, tmp_path / "pairs", WriterOptions(samples_per_shard=100), show_progress=False)
    encoder = _tiny_clip()
    dataset = resolve_dataset(str(tmp_path / "pairs"), cache_dir=tmp_path)
    assert dataset.kind == "retrieval"
    metrics = zeroshot_retrieval(encoder, dataset, _opts())
    assert metrics["images"] == 300 and metrics["captions"] == 600
    # Reference: the full text x image matrix and top-k index sets, as CLIP_benchmark computes it.
    feats = extract_features(encoder, dataset.test, _opts(), captions=True)
    texts = [line for c in feats.captions for line in c.split("\n")]
    owner = np.repeat(np.arange(300), 2)
    text = torch.cat([encoder.encode_text(torch.stack([encoder.tokenizer()(t) for t in texts[i:i + 200]]))
                      for i in range(0, 600, 200)]).detach()
    scores = (text @ feats.image.T).numpy()
    for k in (1, 5, 10):
        top_images = np.argsort(-scores, axis=1)[:, :k]
        t2i = (top_images == owner[:, None]).any(1).mean()
        top_texts = np.argsort(-scores.T, axis=1)[:, :k]
        i2t = (owner[top_texts] == np.arange(300)[:, None]).any(1).mean()
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i, abs=1e-3)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t, abs=1e-3)
    assert metrics["text_retrieval_recall@10"] > metrics["text_retrieval_recall@1"]


def test_text_encoding_skips_padding_with_the_same_embeddings():
    # Our open_clip text path runs only the used prefix of the context; open_clip runs all of it.
    from polymodal.eval.datasets import openai_imagenet_templates
    from polymodal.eval.encoders import _TrimmedCausalText

    torch.manual_seed(0)
    encoder = load_encoder("open_clip:polymodal-tiny-vit")
    model = encoder.image_fn.owner
    assert isinstance(encoder.text_fn, _TrimmedCausalText)
    prompts = [t.replace("{c}", name) for t in openai_imagenet_templates()[:40] for name in ("cat", "great white shark")]
    tokens = torch.stack([torch.as_tensor(encoder.tokenizer()(p)) for p in prompts])
    assert tokens.shape[1] == 32 and int(tokens.ne(0).sum(dim=1).max()) < 25  # the tiny config: context 32
    with torch.no_grad():
        ours = encoder.encode_text(tokens)
        reference = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_image_only_model_refuses_zero_shot(cifar_test_shards: Path, tmp_path: Path):
    encoder = load_encoder("timm:resnet18", image_size=32)
    dataset = resolve_dataset(str(cifar_test_shards / "test" / "0.tar"), cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="image-only"):
        zeroshot_classification(encoder, dataset, _opts())
    with pytest.raises(ConfigError, match="expected a run folder"):
        load_encoder("no-such-model")


def test_cli_probe_knn_outputs_and_raw_sources(cifar_test_shards: Path, data_root: Path, tmp_path: Path):
    """EfficientNet-Lite0 (packaged ImageNet weights): linear probe and kNN fit on CIFAR-10 test shards 0-1,
    scored on shard 2; and Fashion-MNIST read straight from its IDX file (converted once into the cache)."""
    shards = cifar_test_shards / "test"
    out = tmp_path / "results"
    cmd = polymodal_cmd() + ["eval", "--model", "efficientnet-lite0", "--dataset", f"cifar={shards}/2.tar",
                             "--train", f"{shards}/{{0..1}}.tar", "--task", "linear_probe", "--task", "knn",
                             "--image-size", "64", "--workers", "1", "--output", str(out),
                             "--cache-dir", str(tmp_path / "cache"), "-q"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads((out / "cifar_efficientnet-lite0_linear_probe.json").read_text())
    knn = json.loads((out / "cifar_efficientnet-lite0_knn.json").read_text())
    assert set(probe) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert probe["metrics"]["train_samples"] == 2000 and probe["metrics"]["test_samples"] == 1000
    # ImageNet features separate CIFAR-10 well above chance (10%) even at 64 px with 2,000 training images.
    assert probe["metrics"]["lp_acc1"] > 0.5 and knn["metrics"]["knn_acc1"] > 0.4
    for name in ("results.csv", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    assert "lp_acc1" in (out / "results.md").read_text() and len(list((tmp_path / "cache" / "features").iterdir())) == 2

    idx = data_root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    dataset = resolve_dataset(str(idx), cache_dir=tmp_path / "cache", classnames=["a", "b", "c", "d", "e", "f", "g",
                                                                                  "h", "i", "j"], quiet=True)
    assert dataset.classnames[0] == "a" and len(list(Path(dataset.test).glob("*.tar"))) == 10


def test_two_ranks_give_the_same_numbers(cifar_test_shards: Path, tmp_path: Path):
    shards = cifar_test_shards / "test"
    results = {}
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}"
        launcher = polymodal_cmd() if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc_per_node={ranks}", "-m", "polymodal"]
        cmd = launcher + ["eval", "--model", TINY_CLIP, "--dataset", f"c10={shards}/{{0..2}}.tar",
                          "--train", f"{shards}/{{3..5}}.tar", "--task", "zeroshot_classification", "--task", "knn",
                          "--workers", "1", "--output", str(out), "--no-cache", "-q"]
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[ranks] = {p.name: json.loads(p.read_text())["metrics"] for p in out.glob("*.json")}
    assert len(results[1]) == 2 and results[1].keys() == results[2].keys()
    for name, metrics in results[1].items():
        for key, value in metrics.items():
            assert results[2][name][key] == pytest.approx(value, abs=1e-3), (name, key)


def test_feature_cache_key_follows_seed_and_weights_file(tmp_path):
    # A randomly initialised model's features depend on the seed, and a run retrained into the same folder has new
    # weights: neither may be served cached features of the other.
    import os

    from polymodal.eval.encoders import cache_identity

    assert cache_identity("timm:resnet18", 0) != cache_identity("timm:resnet18", 1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"old weights")
    before = cache_identity(str(run), 0)
    assert cache_identity(str(run), 0) == before  # unchanged weights: the cache is reused
    (run / "model.safetensors").write_bytes(b"new weights, longer")
    os.utime(run / "model.safetensors", ns=(1, 1))
    assert cache_identity(str(run), 0) != before
    spec = f"timm:resnet18:{run / 'model.safetensors'}"
    first = cache_identity(spec, 0)
    (run / "model.safetensors").write_bytes(b"newer")
    assert cache_identity(spec, 0) != first
