"""The WordPiece vocabulary with 4M's extra tokens, trained on real captions, and palettes and metadata written
through it."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO, polymodal_cmd, subprocess_env
from polymodal.tokenizers.text import (TextTokenizer, parse_metadata, parse_palette, serialize_metadata,
                                       serialize_palette, train_wordpiece)


@pytest.fixture(scope="module")
def captions(data_root):
    emoji = [json.loads(line)["name"] for line in (data_root / "emoji" / "captions.jsonl").read_text().splitlines()]
    glosses = [json.loads(line)["gloss"] for line in
               (data_root / "imagenet-samples" / "captions_wordnet.jsonl").read_text().splitlines()]
    return emoji[:1300] + glosses[:900], emoji[1300:] + glosses[900:]  # train, held out


@pytest.fixture(scope="module")
def vocab(captions):
    return train_wordpiece(captions[0], vocab_size=3000, sentinels=20)


def test_extra_tokens_are_single_ids_and_captions_round_trip(vocab, captions):
    text = "[caption] a grinning face with big eyes [S_3] [EOS]"
    ids = vocab.encode(text)
    assert ids[0] == vocab.modality_start("caption") and ids[-1] == vocab.eos_id and vocab.sentinel(3) in ids
    assert vocab.decode(ids) == text
    for held_out in captions[1][:50]:  # lower-cased, BERT's punctuation splitting, nothing lost
        assert vocab.decode(vocab.encode(held_out)).replace(" ", "") == held_out.lower().replace(" ", "")
    assert vocab.unknown_rate(captions[1]) < 0.01
    assert vocab.unknown_rate(["ключ 🔑"]) > 0  # characters never seen in training are [UNK]
    with pytest.raises(ValueError, match="no start token"):
        vocab.modality_start("depth")
    with pytest.raises(ValueError, match="out of range"):
        vocab.sentinel(20)


def test_palettes_and_metadata_round_trip_after_binning(vocab):
    palette = [(255, 0, 10), (3, 128, 77), (64, 64, 64)]
    text = serialize_palette(palette)
    assert text.split()[0] == "v1=3" and len(text.split()) == 10
    assert parse_palette(vocab.decode(vocab.encode(text))) == palette  # 256 bins: exact
    coarse = parse_palette(serialize_palette(palette, bins=32), bins=32)
    assert all(abs(a - b) <= 4 for c, d in zip(coarse, palette) for a, b in zip(c, d))
    spec = {"brightness": (0.0, 1.0), "contrast": (0.0, 0.5), "original_width": (0.0, 4096.0)}
    values = {"brightness": 0.42, "contrast": 0.31, "original_width": 500.0}
    back = parse_metadata(vocab.decode(vocab.encode(serialize_metadata(values, spec))), spec)
    for name, value in values.items():  # equal after binning: within half a bin
        low, high = spec[name]
        assert abs(back[name] - value) <= (high - low) / 256 / 2 + 1e-9
    assert all(len(vocab.encode(t)) == 1 for t in ("v1=2", "v0=255", "[S_0]", "[PAD]"))


def test_save_load_keeps_the_fingerprint_and_a_retrained_vocabulary_differs(vocab, captions, tmp_path):
    loaded = TextTokenizer.load(vocab.save(tmp_path / "tokenizer.json"))
    assert loaded.fingerprint == vocab.fingerprint and loaded.vocab_size == 3000
    other = train_wordpiece(captions[0][:1000], vocab_size=3000, sentinels=20)
    assert other.fingerprint != vocab.fingerprint


def test_train_text_command_writes_the_vocabulary_and_its_held_out_figures(tmp_path, data_root):
    done = subprocess.run(polymodal_cmd() + ["tokenizer", "train-text", str(REPO / "polymodal" / "demo_data" / "train"
                                                                           / "0.tar.gz"),
                                             str(data_root / "imagenet-samples" / "captions_wordnet.jsonl"),
                                             "--field", "gloss", "-o", str(tmp_path), "--vocab-size", "3000"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["train_texts"] + stats["held_out_texts"] == 1500 and stats["held_out_unknown_rate"] < 0.01
    assert TextTokenizer.load(tmp_path).fingerprint == stats["fingerprint"]
    bad = subprocess.run(polymodal_cmd() + ["tokenizer", "train-text", str(data_root / "imagenet-samples" /
                                                                           "captions_wordnet.jsonl"), "-o",
                                            str(tmp_path / "x")], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "needs --field" in bad.stderr


def test_open_clips_bpe_through_the_same_interface(captions):
    import open_clip

    from polymodal.tokenizers.text import OpenClipBPE

    bpe = OpenClipBPE()
    stock = open_clip.get_tokenizer("ViT-B-32")
    for text in captions[1][:20]:
        ids = bpe.encode(text)
        assert ids.tolist() == stock([text])[0][: len(ids)].tolist()  # open_clip's ids, without the padding
        assert bpe.decode(ids) == bpe.decode(stock([text])[0])
    assert bpe.vocab_size == 49408 and bpe.fingerprint == OpenClipBPE().fingerprint
