"""The held-out 4M figures on real Fashion-MNIST modalities (image, Canny edges, class-painted segmentation and
captions, each tokenized as the recipe does): class names are found as whole words, the measures behind the chained
and edges -> image figures (painted class, foreground IoU, edge F1, PSNR) score real maps as they should, and
`python -m polymodal.eval.fourm_heldout` with --chain and --psnr-from runs end to end on a briefly trained model."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from conftest import export_tokenizer
from polymodal.data import derive
from polymodal.data.config import DataConfig
from polymodal.data.derive_shards import DeriveJob, DeriveOptions
from polymodal.data.pipeline import ShardLoader
from polymodal.data.shard_map import map_shards
from polymodal.data.sources import SourceOptions, open_source
from polymodal.data.writer import WriterOptions, write_shards
from polymodal.distributed import Placement
from polymodal.eval import fourm_chained
from polymodal.eval.fourm_heldout import named_classes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FASHION = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TOKENS = ["tok_rgb", "tok_edges", "tok_fgmask", "tok_caption"]


def test_class_names_count_as_whole_words_and_not_inside_a_longer_name():
    assert named_classes("a picture showing a t - shirt / top.", FASHION) == [0]  # not also "shirt"
    assert named_classes("a picture showing a shirt.", FASHION) == [6]
    assert named_classes("A Bag beside a coat", FASHION) == [4, 8]
    assert named_classes("an ankle boot", FASHION) == [9]
    assert named_classes("two shirts and a dresser", FASHION) == []  # whole words only


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory, data_root):
    """300 Fashion-MNIST training and 100 test images as shards with template captions, their edges and
    class-painted foregrounds derived, and every modality tokenized (seeded, untrained tokenizers: valid tokens)."""
    from polymodal.data.tokenize_shards import TokenizeJob, TokenizeOptions
    from polymodal.tokenizers.cli import read_texts
    from polymodal.tokenizers.text import train_wordpiece

    root = tmp_path_factory.mktemp("fmnist4m")
    for split, idx, count in (("train", "train", 300), ("test", "t10k", 100)):
        source = open_source(str(data_root / "fashion-mnist" / f"{idx}-images-idx3-ubyte.gz"),
                             SourceOptions(classnames=FASHION, label_captions=["a picture showing a {c}."],
                                           limit=count))
        write_shards(source, root / "src", WriterOptions(samples_per_shard=100, workers=1), split=split,
                     show_progress=False)
        map_shards(str(root / "src" / split), root / "derived" / split,
                   DeriveJob("edges,fgmask", DeriveOptions(classnames=FASHION)), workers=1, show_progress=False)
    tokenizers = {"rgb": export_tokenizer(root / "tok-rgb", image_size=28).parent,
                  "edges": export_tokenizer(root / "tok-edges", image_size=28, modality="edges", channels=1).parent,
                  "fgmask": export_tokenizer(root / "tok-fgmask", image_size=28, modality="fgmask", channels=8,
                                             classes=11, levels=[5, 5, 5]).parent}
    train_wordpiece(read_texts(str(root / "src" / "train"), None), vocab_size=600, sentinels=10).save(
        root / "wp" / "tokenizer.json")
    for split in ("train", "test"):
        out = root / "tok" / split  # one folder per job, as recipes/4m-fmnist.sh; then all four sets side by side
        crops = 2 if split == "train" else 1
        map_shards(str(root / "src" / split), out / "image", TokenizeJob({"rgb": str(tokenizers["rgb"])},
                   {"caption": str(root / "wp")}, TokenizeOptions(crops=crops)), workers=1, show_progress=False)
        for name in ("edges", "fgmask"):
            map_shards(str(root / "derived" / split / name), out / name, TokenizeJob(
                {name: str(tokenizers[name])}, {}, TokenizeOptions(crops=crops)), workers=1, show_progress=False)
        for job in ("image", "edges", "fgmask"):
            for tokens in (out / job).glob("tok_*"):
                tokens.rename(out / tokens.name)
    return root


def test_class_maps_tokenize_and_a_job_that_writes_nothing_exits_with_an_error(fmnist, tmp_path, capsys):
    from polymodal.cli import main

    stats = json.loads((fmnist / "tok" / "train" / "fgmask" / "stats.json").read_text())
    assert stats["sets"]["tok_fgmask"]["samples"] == 300 and not stats["failures"]
    # A set whose every class map is cut short: nothing can be written, so the job fails instead of leaving an
    # empty token set behind.
    broken = tmp_path / "broken"
    broken.mkdir()
    with tarfile.open(fmnist / "derived" / "test" / "fgmask" / "0.tar") as source, \
            tarfile.open(broken / "0.tar", "w") as target:
        for member in list(source)[:20]:
            data = source.extractfile(member).read()[:40]
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    code = main(["data", "tokenize", str(broken), str(tmp_path / "out"), "--tokenizer",
                 f"fgmask={fmnist / 'tok-fgmask'}", "--workers", "1", "-q"])
    assert code == 2 and "no sample could be written: all 20 failed" in capsys.readouterr().err


def test_separate_tokenize_jobs_store_the_same_crops_for_a_sample(fmnist):
    """The recipe tokenizes the image and each derived set in jobs of their own: their random crops must agree."""
    import numpy as np

    def crops(name):
        with tarfile.open(fmnist / "tok" / "train" / name / "1.tar") as tar:
            return {m.name.split(".")[0]: np.load(io.BytesIO(tar.extractfile(m).read()))
                    for m in tar if m.name.endswith(".crops.npy")}

    rgb, edges, fgmask = crops("tok_rgb"), crops("tok_edges"), crops("tok_fgmask")
    assert len(rgb) == 100 and rgb.keys() == edges.keys() == fgmask.keys()
    assert all(rgb[k].shape == (2, 5) and np.array_equal(rgb[k], edges[k]) and np.array_equal(rgb[k], fgmask[k])
               for k in rgb)
    assert len({tuple(v[1]) for v in rgb.values()}) > 80  # the second crop is random per sample (28 px: few repeat)


def test_the_chain_measures_score_real_maps(fmnist):
    cfg = DataConfig(shards=str(fmnist / "src" / "test"), modalities=["rgb", "label"], image_size=None,
                     batch_size=50, num_workers=0, shuffle_buffer=0, shuffle_shards=False, augment=False)
    batch = next(iter(ShardLoader(cfg, where=Placement(0, 1))))
    pixels, labels = batch["rgb"].float() / 255, batch["label"]
    painted = derive.foreground_mask(pixels, labels)
    assert torch.equal(fourm_chained.painted_class(painted, 11), labels)
    assert (fourm_chained.painted_class(torch.zeros_like(painted), 11) == -1).all()
    foreground = painted > 0
    assert torch.allclose(fourm_chained.iou(foreground, foreground), torch.ones(50))
    assert fourm_chained.iou(foreground, foreground.roll(1, 0)).mean() < 0.9  # another image's foreground
    edges = derive.edges(pixels)[:, 0] > 0
    assert torch.allclose(fourm_chained.edge_f1(edges, edges), torch.ones(50))
    shifted = edges.roll(1, 2)  # one pixel to the right: within the tolerance
    assert fourm_chained.edge_f1(shifted, edges).mean() > 0.95
    assert fourm_chained.edge_f1(edges.roll(4, 2), edges).mean() < 0.8
    assert fourm_chained.edge_f1(edges.roll(1, 0), edges).mean() < fourm_chained.edge_f1(shifted, edges).mean()
    mean_image = pixels.mean(0, keepdim=True)
    assert fourm_chained.psnr(pixels, pixels).min() > 90
    assert 5 < fourm_chained.psnr(mean_image.expand_as(pixels), pixels).mean() < 30


def test_held_out_figures_with_chain_and_psnr_run_end_to_end(fmnist, tmp_path):
    from polymodal.eval import fourm_heldout
    from polymodal.pretrain.export import write_safetensors
    from polymodal.pretrain.objectives import build_objective

    tokens = fmnist / "tok" / "train"
    vocab = json.loads((tokens / "tok_caption" / "stats.json").read_text())["tokens"]["vocab_size"]
    image = {"vocab_size": 1000, "grid": [7, 7]}
    section = {"name": "4m", "dim": 32, "encoder_depth": 2, "decoder_depth": 2, "heads": 2, "sentinels": 10,
               "input_tokens": 24, "target_tokens": 24, "modalities": {
                   "tok_rgb": {**image, "tokenizer": str(fmnist / "tok-rgb")},
                   "tok_edges": {**image, "tokenizer": str(fmnist / "tok-edges")},
                   "tok_fgmask": {"vocab_size": 125, "grid": [7, 7], "tokenizer": str(fmnist / "tok-fgmask")},
                   "tok_caption": {"vocab_size": vocab, "max_length": 12, "tokenizer": str(fmnist / "wp")}}}
    torch.manual_seed(0)
    objective = build_objective(section)
    cfg = DataConfig(shards=str(fmnist / "src" / "train"), join=[str(tokens / t) for t in TOKENS], modalities=TOKENS,
                     image_size=None, batch_size=32, num_workers=0, shuffle_buffer=0, shuffle_shards=False)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    for _, batch in zip(range(10), ShardLoader(cfg, where=Placement(0, 1))):
        loss = objective(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run = write_safetensors(objective.state_dict(), tmp_path / "model.safetensors",
                            {"polymodal.objective": json.dumps(section), "polymodal.image_size": "28"})
    (fmnist / "classnames.txt").write_text("\n".join(FASHION))
    out = tmp_path / "heldout.json"
    test_join = [str(fmnist / "tok" / "test" / t) for t in TOKENS]
    assert fourm_heldout.main([str(run), "--test", str(fmnist / "src" / "test"), "--test-join", *test_join,
                               "--train", str(fmnist / "src" / "train"), "--train-join",
                               *[str(tokens / t) for t in TOKENS], "--classnames", str(fmnist / "classnames.txt"),
                               "--batches", "1", "--per-class", "2", "--generate", "maskgit:4",
                               "--chain", "tok_fgmask", "tok_edges", "--psnr-from", "tok_edges", "--cfg", "2",
                               "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["cross_entropy"]) == set(TOKENS)
    chained = result["chained"]
    assert chained["chain"] == ["tok_caption", "tok_fgmask", "tok_edges", "tok_rgb"]
    assert chained["cfg"] == result["caption_to_image"]["cfg"] == 2
    for path in ("chained", "direct"):
        figures = chained[path]
        assert set(figures) == {"image_class_consistency", "tok_fgmask_class_consistency", "tok_fgmask_foreground_iou",
                                "tok_edges_edge_f1"}
        assert all(0 <= v <= 1 for v in figures.values())
    # The direct path is scored against the chain's segmentation: the same maps, so the same painted classes.
    assert chained["chained"]["tok_fgmask_class_consistency"] == chained["direct"]["tok_fgmask_class_consistency"]
    psnr = result["image_from"]["psnr_db"]
    assert result["image_from"]["images"] == 100 and all(5 < v < 60 for v in psnr.values())
    for estimate, gain in result["image_from"]["above_mean_image_db"].items():  # paired, per image
        assert gain["mean"] == pytest.approx(psnr[estimate] - psnr["mean_image"], abs=1e-6)
        assert gain["ci95"][0] < gain["mean"] < gain["ci95"][1] and 0 <= gain["share_above"] <= 1
    assert 0 <= result["caption_to_image"]["class_consistency"]["maskgit:4"] <= 1
