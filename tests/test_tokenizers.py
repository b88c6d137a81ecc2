"""Image tokenizers: round trips, fingerprints, categorical maps, and training on the engine with real CIFAR-10."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import REPO, polymodal_cmd, subprocess_env
from polymodal.tokenizers import FingerprintMismatch, ImageTokenizer, check_fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cifar_images(data_root):
    """64 real CIFAR-10 test images in [-1, 1]."""
    import io
    import itertools

    import numpy as np
    from PIL import Image

    from polymodal.data.sources import SourceOptions, open_source

    records = itertools.islice(open_source(str(data_root / "cifar10" / "test.tar.gz"), SourceOptions()).records(), 64)
    images = [np.asarray(Image.open(io.BytesIO(r["rgb"])).convert("RGB")) for r in records]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.parametrize("quantizer,backbone", [("fsq", "conv"), ("vq", "conv"), ("vq", "vit")])
def test_encode_then_decode_is_the_models_own_reconstruction(quantizer, backbone, cifar_images):
    torch.manual_seed(0)
    tok = ImageTokenizer(quantizer, width=32, downsample=4, backbone=backbone, vit_depth=2)
    tok(cifar_images[:32])  # VQ: k-means initialisation of the codebook on real images
    tok.eval()
    ids = tok.encode(cifar_images[:8])
    assert ids.shape == (8, 8, 8) and tok.grid(32) == (8, 8)
    assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size
    with torch.no_grad():
        recon, same_ids, _ = tok(cifar_images[:8])
    assert torch.equal(ids, same_ids)
    torch.testing.assert_close(tok.decode(ids), recon.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode(ids + tok.vocab_size)
    assert tok.vocab_size == (1000 if quantizer == "fsq" else 1024)
    # A distribution decodes through each token's expected code: one-hot rows give the ids' own decoding, and an
    # even mix of two grids gives the decoder of the mean of their codes.
    one_hot = torch.nn.functional.one_hot(ids, tok.vocab_size).float()
    torch.testing.assert_close(tok.decode_distribution(one_hot), tok.decode(ids), atol=1e-5, rtol=1e-5)
    other = ids.roll(1, dims=0)
    mixed = tok.decode_distribution((one_hot + torch.nn.functional.one_hot(other, tok.vocab_size).float()) / 2)
    assert not torch.allclose(mixed, tok.decode(ids), atol=1e-3) and mixed.abs().max() <= 1


def test_a_vit_tokenizer_learns_to_reconstruct_real_images(cifar_images):
    """The ViT backbone (our transformer blocks on the token grid) trains: 60 Adam steps on 48 real CIFAR-10
    images raise the PSNR on 16 other ones by more than 3 dB."""
    torch.manual_seed(0)
    tok = ImageTokenizer("fsq", width=32, downsample=4, backbone="vit", vit_depth=2)
    train, held = cifar_images[:48], cifar_images[48:]

    def psnr() -> float:
        with torch.no_grad():
            recon = tok(held)[0].clamp(-1, 1)
        return float(10 * torch.log10(4.0 / (recon - held).square().mean()))

    before = psnr()
    optimizer = torch.optim.Adam(tok.parameters(), lr=2e-3)
    for _ in range(60):
        recon, _, aux = tok(train)
        loss = tok.reconstruction_loss(recon, train) + aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert psnr() > before + 3, (before, psnr())


def test_the_fingerprint_ties_tokens_to_one_tokenizer():
    torch.manual_seed(0)
    a = ImageTokenizer("fsq", width=32)
    b = ImageTokenizer("fsq", width=32)
    b.load_state_dict(a.state_dict())
    assert a.fingerprint == b.fingerprint
    check_fingerprint(a.fingerprint, b)
    with torch.no_grad():
        b.decoder[0].weight[0, 0, 0, 0] += 1e-3
    assert a.fingerprint != b.fingerprint
    with pytest.raises(FingerprintMismatch, match="tokenize again"):
        check_fingerprint(a.fingerprint, b, "shard 0")
    assert ImageTokenizer("fsq", width=32, levels=[8, 8, 8, 5, 5, 5]).vocab_size == 64000


def test_a_categorical_map_goes_in_as_class_ids_and_comes_out_as_class_ids():
    torch.manual_seed(0)
    tok = ImageTokenizer("fsq", classes=11, channels=8, width=32, downsample=2).eval()
    labels = torch.randint(0, 11, (2, 16, 16))
    logits, ids, _ = tok(labels)
    assert logits.shape == (2, 11, 16, 16) and ids.shape == (2, 8, 8)
    decoded = tok.decode(ids)
    assert decoded.shape == (2, 16, 16) and decoded.dtype == torch.long and int(decoded.max()) < 11


@pytest.mark.parametrize("config", ["tokenizer-fsq-cifar.yaml", "tokenizer-vq-cifar.yaml"])
def test_a_tokenizer_trains_on_the_engine_with_its_metrics(config, cifar_test_shards, tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(polymodal_cmd() + ["pretrain", str(REPO / "configs" / config),
                                             f"data.shards={cifar_test_shards / 'test'}", f"run_dir={run}",
                                             "steps=30", "data.batch_size=64", "data.num_workers=1",
                                             "log.progress=false", "log.images_every=30", "checkpoint.every=0",
                                             "objective.width=32", "optim.warmup_steps=5"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert last["psnr"] > first["psnr"] + 3  # it learns to reconstruct real images
    assert 0 < last["codebook_usage"] <= 1 and last["perplexity"] > 10 and last["ssim"] > first["ssim"]
    assert list(run.glob("**/*.png"))  # reconstruction pictures
    evaluated = subprocess.run(polymodal_cmd() + ["tokenizer", "eval", str(run), "--dataset",
                                                  str(cifar_test_shards / "test"), "--limit", "300", "-q",
                                                  "--output", str(tmp_path / "eval"), "--workers", "1"],
                               cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())["metrics"]
    assert next((tmp_path / "eval").glob("*.png")).stat().st_size > 1000  # held-out reconstructions
    assert metrics["images"] == 300 and 0 < metrics["ssim"] <= 1 and 0 < metrics["codebook_usage"] <= 1
    assert abs(metrics["psnr"] - last["psnr"]) < 3  # held-out images reconstruct about as well as training ones


def test_vq_tokenizer_training_resumes_exactly(cifar_test_shards, tmp_path):
    """The VQ-VAE's EMA codebook, k-means initialisation and dead-code restarts are state too: a run stopped at
    step 4 and resumed gives the uninterrupted run's losses bit for bit."""

    def pretrain(run, *extra, check=True):
        done = subprocess.run(polymodal_cmd() + ["pretrain", str(REPO / "configs" / "tokenizer-vq-cifar.yaml"),
                                                 f"data.shards={cifar_test_shards / 'test'}", f"run_dir={run}",
                                                 "data.batch_size=32", "data.num_workers=1", "log.progress=false",
                                                 "log.images_every=0", "checkpoint.every=4", "objective.width=16",
                                                 "optim.warmup_steps=2", *extra],
                              cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 or not check, done.stderr[-3000:]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["loss"] for row in rows}

    whole = pretrain(tmp_path / "whole", "steps=8")
    # Killed (SIGKILL) while writing the step-8 checkpoint: the resumed run starts from step 4.
    pretrain(tmp_path / "parts", "steps=8", "faults.inject_kill_in_checkpoint=8", check=False)
    assert (tmp_path / "parts" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    resumed = pretrain(tmp_path / "parts", "steps=8", "resume=latest")
    assert len(whole) == 8 and resumed == whole, (whole, resumed)


def test_vq_tokenizer_trains_at_zero_2_in_bf16_on_two_ranks(cifar_test_shards, tmp_path):
    """ZeRO-2 and bf16 on two torchrun ranks: the EMA codebook (buffers, updated in forward) stays in step."""
    import sys

    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "polymodal", "pretrain", str(REPO / "configs" / "tokenizer-vq-cifar.yaml"),
                           f"data.shards={cifar_test_shards / 'test'}", f"run_dir={run}", "steps=12",
                           "zero_stage=2", "precision=bf16", "data.batch_size=32", "data.num_workers=1",
                           "log.progress=false", "log.images_every=0", "checkpoint.every=0", "objective.width=16",
                           "optim.warmup_steps=2"],
                          cwd=REPO, env=subprocess_env() | {"DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["psnr"] > rows[0]["psnr"] + 2 and rows[-1]["codebook_usage"] > 0.05
    from polymodal.pretrain.export import load_exported

    objective = load_exported(run / "model.safetensors")
    assert objective.tokenizer_model.vocab_size == 1024


def test_a_64000_code_fsq_writes_uint16_tokens():
    """FSQ [8,8,8,5,5,5] has 64,000 codes: uint16 holds them (ml-4m's int16 would not)."""
    import numpy as np

    from polymodal.data.tokenize_shards import token_dtype

    tok = ImageTokenizer("fsq", width=16, levels=[8, 8, 8, 5, 5, 5]).eval()
    ids = tok.encode(torch.rand(64, 3, 16, 16) * 2 - 1)
    assert tok.vocab_size == 64000 and token_dtype(tok.vocab_size) == np.uint16 and token_dtype(70000) == np.int32
    assert np.array_equal(ids.numpy().astype(token_dtype(tok.vocab_size)).astype(np.int64), ids.numpy())
