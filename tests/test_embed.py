"""`polymodal embed`, `index` and `search` on real data: the emoji pairs (image + caption, the tiny CLIP) and the
CIFAR-10 test set (10,000 images, timm ResNet-18 at 32 px).

Checked: clip-retrieval's layout and row alignment, embeddings equal to encoding the inputs directly, corrupt
samples listed and skipped, resume after kill -9 equal to an uninterrupted run, 2 ranks equal to 1, caption
files, and search finding what was embedded.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, polymodal_cmd, subprocess_env

TINY_CLIP = "open_clip:polymodal-tiny-vit"
RESNET = ["--model", "timm:resnet18", "--image-size", "32"]


def embed(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(polymodal_cmd() + ["embed", "-q", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=900, **kw)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def shard_keys(url: Path) -> list[str]:
    from polymodal.data.tar_samples import iter_shard

    return [raw["__key__"] for _, raw in iter_shard(str(url), None)]


def read_output(out: Path) -> dict[str, object]:
    """Every file of the output (arrays, tables, skipped lists) by relative path, for exact comparisons."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = str(path.relative_to(out))
        if path.suffix == ".npy":
            files[rel] = np.load(path)
        elif path.suffix == ".parquet":
            files[rel] = pq.read_table(path).to_pylist()
        elif path.suffix == ".jsonl":
            files[rel] = path.read_text()
    return files


@pytest.fixture(scope="module")
def emoji_embedded(emoji_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("emoji-emb")
    done = embed("--model", TINY_CLIP, "--input", str(emoji_shards), "--output", str(out), "--dtype", "float32",
                 "--batch-size", "100")
    return out, done


def test_layout_rows_and_keys_match_the_shards(emoji_shards, emoji_embedded):
    out, done = emoji_embedded
    shards = sorted(emoji_shards.glob("*.tar"))
    assert json.loads((out / "embed_info.json").read_text())["what"] == ["img", "text"]
    total = 0
    for n, shard in enumerate(shards):
        meta = pq.read_table(out / "metadata" / f"metadata_{n}.parquet").to_pylist()
        img, text = np.load(out / "img_emb" / f"img_emb_{n}.npy"), np.load(out / "text_emb" / f"text_emb_{n}.npy")
        assert [m["key"] for m in meta] == shard_keys(shard)  # row i of the parquet is sample i of shard n
        assert img.shape == (len(meta), 256) and text.shape == (len(meta), 256) and img.dtype == np.float32
        assert all(m["caption"] and m["shard"] == str(shard) for m in meta)
        np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
        total += len(meta)
    assert total == 1911  # every emoji pair
    assert "embedded 1911 samples (img+text)" in done.stdout


def test_embeddings_equal_encoding_the_inputs_directly(emoji_shards, emoji_embedded):
    # "Directly": open_clip's own model, PIL loading and eval transform, and tokenizer, on the shard's members.
    import open_clip
    from PIL import Image

    from polymodal.eval.encoders import load_encoder

    out, _ = emoji_embedded
    torch.manual_seed(0)  # the seed polymodal embed gives randomly initialised models
    model = load_encoder(TINY_CLIP).image_fn.owner.eval()
    preprocess = open_clip.image_transform(64, is_train=False, mean=model.visual.preprocess_cfg["mean"],
                                           std=model.visual.preprocess_cfg["std"])
    tokenizer = open_clip.get_tokenizer("polymodal-tiny-vit")
    shard = sorted(emoji_shards.glob("*.tar"))[2]
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    meta = pq.read_table(out / "metadata" / "metadata_2.parquet").to_pylist()
    rows = list(range(0, len(meta), 37))

    def load(key: str) -> Image.Image:
        # The emoji are RGBA: over white, as polymodal decodes transparency (convert("RGB") keeps whatever colour
        # the transparent pixels happen to hold).
        rgba = Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")

    images = torch.stack([preprocess(load(meta[i]["key"])) for i in rows])
    with torch.no_grad():
        direct_img = torch.nn.functional.normalize(model.encode_image(images), dim=-1).numpy()
        direct_text = torch.nn.functional.normalize(model.encode_text(tokenizer([meta[i]["caption"] for i in rows])),
                                                    dim=-1).numpy()
    stored_img = np.load(out / "img_emb" / "img_emb_2.npy")[rows]
    stored_text = np.load(out / "text_emb" / "text_emb_2.npy")[rows]
    assert (stored_img * direct_img).sum(axis=1).min() >= 0.999
    assert (stored_text * direct_text).sum(axis=1).min() >= 0.999


def test_corrupt_samples_are_skipped_and_listed(emoji_shards, tmp_path):
    src = sorted(emoji_shards.glob("*.tar"))[3]
    bad = tmp_path / "shards" / "0.tar"
    bad.parent.mkdir()
    broken = []
    with tarfile.open(src) as tar_in, tarfile.open(bad, "w") as tar_out:
        for member in tar_in:
            data = tar_in.extractfile(member).read()
            if member.name.endswith(".png") and len(broken) < 3:
                data = data[: len(data) // 3]  # a cut-off PNG
                broken.append(member.name.rsplit(".", 1)[0])
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tar_out.addfile(info, io.BytesIO(data))
    out = tmp_path / "emb"
    done = embed("--model", TINY_CLIP, "--input", str(bad), "--output", str(out), "--what", "image")
    skipped = [json.loads(line) for line in (out / "skipped" / "skipped_0.jsonl").read_text().splitlines()]
    assert sorted(s["key"] for s in skipped) == sorted(broken)
    assert all(s["reason"] == "corrupt_image" and s["error"] for s in skipped), skipped
    keys = [m["key"] for m in pq.read_table(out / "metadata" / "metadata_0.parquet").to_pylist()]
    assert keys == [k for k in shard_keys(src) if k not in broken]
    assert np.load(out / "img_emb" / "img_emb_0.npy").shape[0] == len(keys)
    assert "3 sample(s) skipped" in done.stdout


def test_resume_after_kill_gives_the_same_files(cifar_test_shards, tmp_path):
    shards = str(cifar_test_shards / "test")
    reference = tmp_path / "reference"
    embed(*RESNET, "--input", shards, "--output", str(reference), "--workers", "1")

    out = tmp_path / "killed"
    cmd = polymodal_cmd() + ["embed", "-q", *RESNET, "--input", shards, "--output", str(out), "--workers", "1",
                             "--batch-size", "100"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and len(list((out / "metadata").glob("*.parquet"))) < 3:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "metadata").glob("*.parquet")))
    assert 3 <= finished < 10, finished  # killed mid-run, with finished parts to keep

    done = embed(*RESNET, "--input", shards, "--output", str(out), "--workers", "1", "--batch-size", "100")
    assert f"{finished} finished part(s) kept" in done.stdout
    assert not list(out.rglob("*.tmp"))
    ours, ref = read_output(out), read_output(reference)
    assert sorted(ours) == sorted(ref)
    for name, value in ref.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(ours[name], value), name
        else:
            assert ours[name] == value, name


def test_two_ranks_write_the_same_rows_as_one(cifar_test_shards, tmp_path):
    shards = str(cifar_test_shards / "test")
    one, two = tmp_path / "one", tmp_path / "two"
    embed(*RESNET, "--input", shards, "--output", str(one), "--workers", "1")
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "-m", "polymodal", "embed", "-q", *RESNET, "--input", shards, "--output", str(two),
                           "--workers", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 rank(s)" in done.stdout
    a, b = read_output(one), read_output(two)
    assert sorted(a) == sorted(b)
    keys = [m["key"] for name in sorted(a) if name.startswith("metadata/") for m in a[name]]
    assert len(keys) == len(set(keys)) == 10_000
    for name, value in a.items():
        if isinstance(value, np.ndarray):  # a different thread count may change the last bits of float16
            np.testing.assert_allclose(b[name].astype(np.float32), value.astype(np.float32), atol=2e-3)
        else:
            assert b[name] == value, name


def test_caption_file_index_and_search(data_root, emoji_shards, emoji_embedded, tmp_path):
    # Text embeddings of a caption file, then both indexes; a query equal to an embedded caption (or image)
    # must come back first with cosine ~1.
    rows = [json.loads(line) for line in (data_root / "emoji" / "captions.jsonl").read_text().splitlines()][:300]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": f"e{i}", "caption": r["name"]}) + "\n" for i, r in enumerate(rows)))
    out = tmp_path / "captions-emb"
    embed("--model", TINY_CLIP, "--input", str(captions), "--output", str(out), "--rows-per-part", "128")
    meta = [m for n in range(3) for m in pq.read_table(out / "metadata" / f"metadata_{n}.parquet").to_pylist()]
    assert [m["key"] for m in meta] == [f"e{i}" for i in range(300)]
    assert not (out / "img_emb").exists()

    def run(*args):
        done = subprocess.run(polymodal_cmd() + list(args), cwd=REPO, env=subprocess_env(), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout

    assert "300 rows of 256 dims from 3 part(s), Flat" in run("index", str(out))
    query = rows[123]["name"]
    hits = [json.loads(line) for line in run("search", query, "--embeddings", str(out), "--kind", "text", "-k", "3",
                                             "--json").splitlines()]
    assert hits[0]["caption"] == query and hits[0]["score"] > 0.999 and len(hits) == 3

    pairs, _ = emoji_embedded
    run("index", str(pairs))
    assert (pairs / "image.index").is_file() and (pairs / "text.index").is_file()
    shard = sorted(emoji_shards.glob("*.tar"))[1]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".png"))
        image = tmp_path / "query.png"
        image.write_bytes(tar.extractfile(member).read())
    top = json.loads(run("search", str(image), "--embeddings", str(pairs), "-k", "1", "--json").splitlines()[0])
    assert top["key"] == member.name.rsplit(".", 1)[0] and top["score"] > 0.999


def test_bad_input_gets_one_line(emoji_embedded, tmp_path):
    out, _ = emoji_embedded
    changed = embed("--model", TINY_CLIP, "--input", str(out / "nowhere"), "--output", str(tmp_path / "x"),
                    check=False)
    assert changed.returncode == 2 and "does not exist" in changed.stderr
    info = json.loads((out / "embed_info.json").read_text())
    other = embed("--model", TINY_CLIP, "--input", info["inputs"], "--output", str(out), "--dtype", "float16",
                  check=False)
    assert other.returncode == 2 and "other settings (dtype" in other.stderr


def test_image_folder_input_and_raw_embeddings(data_root, tmp_path):
    # An image folder with class subfolders (60 real CIFAR-10 JPEGs), converted into shards once, embedded
    # without normalisation in float32.
    folder = tmp_path / "images"
    with tarfile.open(data_root / "cifar10" / "test.tar.gz") as tar:
        taken: dict[str, int] = {}
        for member in tar:
            parts = member.name.split("/")  # test/CLASS/NAME.jpg
            if not member.isfile() or len(parts) != 3:
                continue
            label = parts[1]
            if (label not in taken and len(taken) == 3) or taken.get(label) == 20:
                continue  # 20 images of each of the first 3 classes
            taken[label] = taken.get(label, 0) + 1
            (folder / label).mkdir(parents=True, exist_ok=True)
            (folder / label / parts[2]).write_bytes(tar.extractfile(member).read())
    out = tmp_path / "emb"
    done = embed(*RESNET, "--input", str(folder), "--output", str(out), "--no-normalize", "--dtype", "float32",
                 "--cache-dir", str(tmp_path / "cache"))
    assert "embedded 60 samples (img)" in done.stdout
    meta = [m for p in sorted((out / "metadata").glob("*.parquet")) for m in pq.read_table(p).to_pylist()]
    assert len(meta) == 60 and sorted({m["label"] for m in meta}) == [0, 1, 2]
    emb = np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))])
    assert emb.shape == (60, 512) and emb.dtype == np.float32
    assert np.abs(np.linalg.norm(emb, axis=1) - 1).max() > 0.1  # raw features, not unit vectors
