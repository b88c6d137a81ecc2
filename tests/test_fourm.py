"""4M on real token shards (the emoji pairs: image tokens from an FSQ tokenizer, captions through a WordPiece
vocabulary): budgets are drawn exactly and follow the mixture, image inputs and targets are disjoint, span masking
round-trips and cuts targets at sentinels, packed and padded runs agree, absent modalities give no tokens, the loss
falls, bad configs and mismatched token sets are clear errors, and on the engine a ZeRO-3 + bf16 two-rank run
resumes bitwise."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml

from conftest import REPO, export_tokenizer, polymodal_cmd, subprocess_env
from polymodal.data.config import DataConfig
from polymodal.data.errors import ConfigError
from polymodal.data.pipeline import ShardLoader
from polymodal.distributed import Placement
from polymodal.generate.fourm_generate import FourMGenerator, Sampling, Schedule, filter_logits
from polymodal.pretrain.config import load_pretrain_config
from polymodal.pretrain.objectives import build_objective
from polymodal.pretrain.objectives.masking import dirichlet_shares, mixture_shares, split_budget
from polymodal.pretrain.objectives.span_masking import keep_probability, span_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"dim": 32, "encoder_depth": 2, "decoder_depth": 2, "heads": 2}
SENTINELS = 10  # the fixture's vocabulary has 10 sentinels: sequences up to 17 tokens


def modalities(root) -> dict:
    vocab = json.loads((root / "out" / "tok_caption" / "stats.json").read_text())["tokens"]["vocab_size"]
    return {"tok_rgb": {"vocab_size": 1000, "grid": [8, 8], "tokenizer": str(root / "fsq")},
            "tok_caption": {"vocab_size": vocab, "max_length": 16, "tokenizer": str(root / "wp")}}


def fourm(root, **extra):
    torch.manual_seed(0)
    section = {"name": "4m", **SMALL, "modalities": modalities(root), "sentinels": SENTINELS,
               "input_tokens": 24, "target_tokens": 24, **extra}
    return build_objective(section)


@pytest.fixture(scope="module")
def batches(tokenized_emoji, emoji_shards) -> list[dict]:
    root, _ = tokenized_emoji
    cfg = DataConfig(shards=str(emoji_shards), join=[str(root / "out" / "tok_rgb"), str(root / "out" / "tok_caption")],
                     modalities=["tok_rgb", "tok_caption"], image_size=None, batch_size=16, num_workers=0,
                     shuffle_buffer=0, shuffle_shards=False)
    loader = iter(ShardLoader(cfg, where=Placement(0, 1)))
    return [next(loader) for _ in range(6)]


# ------------------------------------------------------------------------------------------------------- budgets

def test_split_budget_is_exact_within_capacity_and_near_the_shares():
    torch.manual_seed(0)
    b, m = 512, 4
    capacity = torch.randint(0, 30, (b, m))
    capacity[:, 2] *= torch.rand(b) < 0.5  # often absent
    shares = dirichlet_shares(capacity > 0, 1.0)
    budget = torch.randint(1, 60, (b,))
    counts = split_budget(shares, capacity, budget)
    assert torch.equal(counts.sum(1), torch.minimum(budget, capacity.sum(1)))
    assert (counts <= capacity).all() and (counts[capacity == 0] == 0).all()
    # Where capacity does not bind, only the rounding moves the counts off the shares.
    roomy = ((shares * budget[:, None] <= capacity - m) | (capacity == 0)).all(1)
    assert roomy.sum() > 50
    assert ((counts - shares * budget[:, None]).abs()[roomy] < m).all()


def test_without_spill_the_budget_is_split_exactly_then_capped_and_nothing_moves_to_other_modalities():
    torch.manual_seed(1)
    b, m = 512, 3
    present = torch.rand(b, m) < 0.8
    shares = dirichlet_shares(present, torch.tensor([0.5, 0.5, 0.0]).expand(b, m))  # the third: alpha 0, never
    budget = torch.randint(1, 40, (b,))
    unlimited = split_budget(shares, torch.full((b, m), 1000), budget, spill=False)
    has_share = (shares > 0).any(1)
    assert torch.equal(unlimited.sum(1)[has_share], budget[has_share]) and (unlimited[:, 2] == 0).all()
    assert ((unlimited - shares * budget[:, None]).abs() < 1).all()  # largest remainder: each within one token
    capacity = torch.randint(0, 12, (b, m))
    capped = split_budget(shares, capacity, budget, spill=False)
    assert torch.equal(capped, unlimited.minimum(capacity))


def test_the_mixture_picks_components_by_weight_and_an_alpha_of_zero_never_gets_tokens():
    torch.manual_seed(0)
    present = torch.ones(4000, 2, dtype=torch.bool)
    alphas = torch.tensor([[1000.0, 0.0], [0.5, 0.5]])  # rgb2all, then all2all
    shares, picks = mixture_shares(present, alphas, torch.tensor([0.25, 0.75]))
    assert abs((picks == 0).float().mean().item() - 0.25) < 0.03
    assert (shares[picks == 0, 1] == 0).all() and torch.allclose(shares[picks == 0, 0], torch.tensor(1.0))
    assert (shares[picks == 1, 1] > 0).float().mean() > 0.99


def test_image_inputs_and_targets_are_disjoint_and_drawn_exactly(tokenized_emoji, batches):
    root, _ = tokenized_emoji
    images_only = fourm(root, modalities={"tok_rgb": modalities(root)["tok_rgb"]})
    inputs, targets, _ = images_only.draw_masks(images_only.read_batch(batches[0]))
    shown, predicted = inputs["tok_rgb"].keep, targets["tok_rgb"].keep
    assert not (shown & predicted).any()
    assert (shown.sum(1) == 24).all() and (predicted.sum(1) == 24).all()
    assert shown.float().std(0).max() > 0  # different tokens for different samples

    both = fourm(root)
    inputs, targets, labels = both.draw_masks(both.read_batch(batches[0]))
    total_in = inputs["tok_rgb"].keep.sum(1) + inputs["tok_caption"].keep.sum(1)
    assert (total_in <= 24).all() and total_in.float().mean() > 12
    assert not (inputs["tok_rgb"].keep & targets["tok_rgb"].keep).any()


@pytest.mark.parametrize("packed", [True, False])
def test_absent_modalities_give_no_tokens(tokenized_emoji, batches, packed):
    root, _ = tokenized_emoji
    objective = fourm(root, packed=packed)
    batch = dict(batches[1])
    present = torch.arange(16) % 2 == 0
    batch["tok_caption_present"] = present
    inputs, targets, _ = objective.draw_masks(objective.read_batch(batch))
    assert not inputs["tok_caption"].keep[~present].any() and not targets["tok_caption"].keep[~present].any()
    assert (inputs["tok_rgb"].keep[~present].sum(1) == 24).all()  # the whole budget goes to what they have
    assert inputs["tok_caption"].keep[present].any()
    loss = objective(batch)["loss"]
    assert torch.isfinite(loss)


# -------------------------------------------------------------------------------------------------- span masking

def random_sequences(b: int = 64, longest: int = 16):
    lengths = torch.randint(1, longest + 1, (b,))
    ids = torch.randint(20, 100, (b, longest)) * (torch.arange(longest) < lengths[:, None])
    return ids, lengths


def fill_spans(given: list[int], wanted: list[int], sentinels: set[int]) -> list[int]:
    """The sequence back from its span-masked input and (uncut) target."""
    spans, current = {}, None
    for token in wanted:
        if token in sentinels:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in given:
        out.extend(spans[token] if token in sentinels else [token])
    return out


def test_span_masking_round_trips_and_fits_the_input_budget():
    torch.manual_seed(0)
    ids, lengths = random_sequences()
    sentinels = torch.arange(3, 3 + SENTINELS)
    as_set = set(sentinels.tolist())
    for scheme in ("random", "all", "binary"):
        budget_in = torch.randint(1, 18, (len(ids),))
        given, wanted = span_mask(ids, lengths, budget_in, torch.full((len(ids),), 100), sentinels,
                                  keep_probability(len(ids), scheme, "cpu"))
        assert (given.lengths <= budget_in).all()
        for row in range(len(ids)):
            g = given.ids[row, : given.lengths[row]].tolist()
            w = wanted.ids[row, : wanted.lengths[row]].tolist()
            assert w[0] in as_set and w[-1] in as_set
            assert fill_spans(g, w, as_set) == ids[row, : lengths[row]].tolist()
    nothing, everything = span_mask(ids, lengths, torch.zeros(len(ids), dtype=torch.long), torch.full((len(ids),), 100),
                                    sentinels, torch.ones(len(ids)))
    assert (nothing.lengths == 0).all() and (everything.lengths == lengths + 2).all()


def test_span_masking_cuts_long_targets_to_a_window_between_sentinels():
    ids, lengths = random_sequences(256)
    sentinels = torch.arange(3, 3 + SENTINELS)
    as_set = set(sentinels.tolist())
    budget_out = torch.randint(1, 8, (len(ids),))
    keep = torch.full((len(ids),), 0.4)
    args = (ids, lengths, torch.full((len(ids),), 16))
    torch.manual_seed(1)
    _, whole = span_mask(*args, torch.full((len(ids),), 100), sentinels, keep)
    torch.manual_seed(1)  # the same keep masks: the cut target must be a window of the whole one
    _, cut = span_mask(*args, budget_out, sentinels, keep)
    ends_at_sentinel = 0
    for row in range(len(ids)):
        w = whole.ids[row, : whole.lengths[row]].tolist()
        c = cut.ids[row, : cut.lengths[row]].tolist()
        assert 1 <= len(c) <= budget_out[row]
        if len(w) <= budget_out[row]:
            assert c == w
            continue
        assert c[0] in as_set and any(w[i:i + len(c)] == c for i in range(len(w)))
        ends_at_sentinel += c[-1] in as_set and len(c) > 1
        assert c[-1] in as_set or len(c) == budget_out[row]  # mid-span only when one span fills the budget
    assert ends_at_sentinel > 20


# ---------------------------------------------------------------------------------------------------- the model

def test_packed_and_padded_give_equal_losses_and_gradients(tokenized_emoji, batches):
    root, _ = tokenized_emoji
    results = []
    for packed in (True, False):
        objective = fourm(root, packed=packed, input_tokens=[4, 40], target_tokens=[4, 40])
        torch.manual_seed(5)
        loss = objective(batches[2])["loss"]
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}))
    (a, grads_a), (b, grads_b) = results
    assert a == pytest.approx(b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4)


def test_unset_packed_runs_padded_on_cpu_and_an_explicit_choice_is_kept(tokenized_emoji, batches, monkeypatch):
    """On CPU no varlen kernel exists (packed sequences are padded one per (sample, modality)), so the default
    layout there is one padded sequence per sample; on CUDA it is packed."""
    from polymodal.models.fourm import FourM

    root, _ = tokenized_emoji
    layouts, real = [], FourM.forward

    def recording(self, inputs, targets, packed=True):
        layouts.append(packed)
        return real(self, inputs, targets, packed)

    monkeypatch.setattr(FourM, "forward", recording)
    for packed in (None, True, False):
        objective = fourm(root, packed=packed)
        assert objective.packed is (False if packed is None else packed)
        objective(batches[0])
    assert layouts == [False, True, False]


def test_the_loss_falls_on_real_tokens_for_both_modalities(tokenized_emoji, batches):
    root, _ = tokenized_emoji
    objective = fourm(root)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    torch.manual_seed(0)
    history = []
    for step in range(36):
        out = objective(batches[step % 4])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in out.items()})
    first, last = history[:4], history[-4:]
    for key in ("loss", "loss_tok_rgb", "loss_tok_caption"):
        before = sum(h[key] for h in first) / 4
        after = sum(h[key] for h in last) / 4
        assert after < before - 0.5, (key, before, after)


def test_loss_types_average_per_modality_or_per_token(tokenized_emoji, batches):
    root, _ = tokenized_emoji
    per_modality, per_token = fourm(root), fourm(root, loss_type="token")
    torch.manual_seed(3)
    a = per_modality(batches[3])
    torch.manual_seed(3)
    b = per_token(batches[3])
    assert a["loss"].item() == pytest.approx((a["loss_tok_rgb"] + a["loss_tok_caption"]).item() / 2, rel=1e-5)
    low, high = sorted([a["loss_tok_rgb"].item(), a["loss_tok_caption"].item()])
    assert low <= b["loss"].item() <= high and b["loss"].item() != pytest.approx(a["loss"].item(), rel=1e-4)


# --------------------------------------------------------------------------------------------------- generation

@pytest.fixture(scope="module")
def trained(tokenized_emoji, batches):
    """The small model after 30 steps on real tokens, with condition dropout (so guidance has a use)."""
    root, _ = tokenized_emoji
    objective = fourm(root, condition_dropout=0.2)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(30):
        loss = objective(batches[step % 4])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return objective.eval()


def image_condition(batches):
    return {"tok_rgb": batches[4]["tok_rgb"][:6]}


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_kv_cached_decoding_equals_rerunning_the_decoder_token_for_token(trained, batches, cfg):
    generator = FourMGenerator(trained, Sampling(temperature=0, cfg=cfg))
    given = {k: generator.condition(k, v) for k, v in image_condition(batches).items()}
    cached = generator.generate_sequence(given, "tok_caption", 6, cache=True)
    rerun = generator.generate_sequence(given, "tok_caption", 6, cache=False)
    assert torch.equal(cached[0], rerun[0]) and torch.equal(cached[1], rerun[1])


def test_the_kv_cache_gives_the_full_decoders_logits_along_a_real_caption(trained, batches):
    from polymodal.models.fourm import Tokens

    model, generator = trained.model, FourMGenerator(trained)
    given = {k: generator.condition(k, v) for k, v in image_condition(batches).items()}
    captions = batches[4]["tok_caption"][:6, :8]
    positions = torch.arange(captions.shape[1]).expand(6, -1)
    with torch.no_grad():
        encoded, at = model.encode(generator.inputs(given), packed=False)
        whole = model.decode(encoded, at, {"tok_caption": Tokens(captions, positions, torch.ones_like(captions).bool())})
        whole = whole["tok_caption"].view(6, captions.shape[1], -1)
        caches = model.decoder.new_caches()
        for t in range(captions.shape[1]):
            x = model.embed_tokens("tok_caption", Tokens(captions[:, t:t + 1], positions[:, t:t + 1], None))
            step = model.heads["tok_caption"](model.decoder.step(x, caches, encoded, at.pad_mask)[:, -1])
            torch.testing.assert_close(step, whole[:, t], atol=1e-5, rtol=1e-5)


def test_chained_generation_runs_seeded_and_ends_sequences_with_eos(trained, batches):
    conditions = {"tok_caption": (batches[4]["tok_caption"][:3], batches[4]["tok_caption_lengths"][:3])}
    for schedule in ("maskgit:4", "roar:8"):
        generator = FourMGenerator(trained, Sampling(temperature=1.0, top_k=100), Schedule.parse(schedule), seed=3)
        out = generator.generate(conditions, ["tok_rgb", "tok_caption"])
        again = FourMGenerator(trained, Sampling(temperature=1.0, top_k=100), Schedule.parse(schedule), seed=3)
        assert torch.equal(out["tok_rgb"], again.generate(conditions, ["tok_rgb", "tok_caption"])["tok_rgb"])
        assert out["tok_rgb"].shape == (3, 8, 8) and 0 <= int(out["tok_rgb"].min()) and int(out["tok_rgb"].max()) < 1000
        ids, lengths = out["tok_caption"]
        assert (ids[torch.arange(3), lengths - 1] == trained.config.eos_id).all()
    other_seed = FourMGenerator(trained, Sampling(temperature=1.0), Schedule.parse("roar:8"), seed=4)
    assert not torch.equal(other_seed.generate(conditions, ["tok_rgb"])["tok_rgb"], out["tok_rgb"])
    unconditional = FourMGenerator(trained, Sampling(temperature=1.0)).generate({}, ["tok_rgb"], batch_size=2)
    assert unconditional["tok_rgb"].shape == (2, 8, 8)


def test_schedules_decode_every_token_once_and_bad_ones_are_refused():
    for text, n in (("maskgit:8", 64), ("roar:16", 256), ("maskgit:16", 64), ("roar:100", 10)):
        counts = Schedule.parse(text).counts(n)
        assert sum(counts) == n and min(counts) >= 1 and len(counts) == min(int(text.split(":")[1]), n)
    maskgit = Schedule.parse("maskgit:8").counts(64)
    assert maskgit[0] < maskgit[-1]  # MaskGIT decodes few tokens first, more later
    for bad in ("cosine:8", "maskgit", "roar:0"):
        with pytest.raises(ConfigError, match="schedule"):
            Schedule.parse(bad)


def test_top_k_and_top_p_keep_the_likeliest_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    probs = logits.softmax(-1)[0]
    nucleus = torch.isfinite(filter_logits(logits, top_p=float(probs[0] + probs[1] / 2)))[0]
    assert nucleus.tolist() == [True, True, False, False, False]


def test_log_images_draws_each_image_modality_beside_its_generation_and_writes_texts(trained, batches, tmp_path):
    from PIL import Image

    out = trained.log_images(batches[4], tmp_path / "step_1.png", max_images=3)
    with Image.open(out) as grid:
        assert grid.size[0] > grid.size[1] / 3 * 2 - 1  # three rows of two tiles (truth, generation)
    texts = json.loads((tmp_path / "step_1.json").read_text())
    assert len(texts["tok_caption"]["generated"]) == 3 and all(isinstance(t, str) for t in texts["tok_caption"]["true"])
    assert trained.training is False and trained.log_images(batches[4], None) is None


def test_a_condition_or_target_the_model_was_not_trained_on_is_refused(trained, batches):
    generator = FourMGenerator(trained)
    with pytest.raises(ConfigError, match="tok_depth"):
        generator.generate({"tok_depth": batches[0]["tok_rgb"]}, ["tok_caption"])
    with pytest.raises(ConfigError, match="tok_depth"):
        generator.generate(image_condition(batches), ["tok_depth"])


def test_held_out_cross_entropy_reports_each_modality_beside_its_unigram_baseline(tokenized_emoji, trained, batches):
    from polymodal.eval.fourm_heldout import held_out_cross_entropy

    root, _ = tokenized_emoji
    learned = held_out_cross_entropy(trained, batches[4:6], batches[:4])
    untrained = held_out_cross_entropy(fourm(root).eval(), batches[4:6], batches[:4])
    assert set(learned) == {"tok_rgb", "tok_caption"}
    for name, figures in learned.items():
        assert figures["tokens"] > 100 and figures["unigram"] == pytest.approx(untrained[name]["unigram"])
        assert figures["cross_entropy"] < untrained[name]["cross_entropy"] - 0.5  # held-out batches


def test_eval_features_come_from_pixels_through_the_image_tokenizer(trained, data_root):
    from conftest import cifar_test_images
    from polymodal.models.fourm import Tokens
    from polymodal.tokenizers.registry import load_image_tokenizer

    normalised = cifar_test_images(data_root, 6, 32)  # ImageNet-normalised: back to uint8 pixels
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rgb = ((normalised * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    encoder = trained.eval_encoder("4m")
    assert encoder.image_size == 32
    features = encoder.encode_image(rgb, normalize=False)
    assert features.shape == (6, 32) and torch.isfinite(features).all()
    assert torch.cdist(features, features).fill_diagonal_(1).min() > 0  # different images, different features
    tokenizer, _ = load_image_tokenizer(trained.modality_configs["tok_rgb"].tokenizer)
    ids = tokenizer.tokenizer_model.encode(tokenizer.inputs({"rgb": rgb})).flatten(1)
    with torch.no_grad():
        encoded, _ = trained.model.encode({"tok_rgb": Tokens(ids, torch.arange(64).expand(6, -1),
                                                             torch.ones_like(ids).bool())}, packed=False)
    torch.testing.assert_close(features, encoded[:, 1:].mean(1), atol=1e-5, rtol=1e-4)


def test_shipped_configs_build():
    from polymodal.pretrain.config import load_pretrain_config

    for name, parameters in (("4m-tiny-cifar", (3e6, 5e6)), ("4m-tiny-fmnist", (2e6, 4e6)), ("4m-b", (400e6, 480e6))):
        cfg = load_pretrain_config(str(REPO / "configs" / f"{name}.yaml"))
        objective = build_objective(cfg.objective)
        count = sum(p.numel() for p in objective.parameters())
        assert parameters[0] < count < parameters[1], (name, count)


# -------------------------------------------------------------------------------------------------- bad input

def test_bad_configs_name_the_key(tokenized_emoji, batches):
    root, _ = tokenized_emoji
    cases = {
        "vocab_size": {"modalities": {"tok_rgb": {"grid": [8, 8]}}},
        "max_length": {"modalities": {"tok_caption": {"vocab_size": 100}}},
        "input_alpha": {"mixture": [{"input_alpha": {"tok_depth": 1.0}}]},
        "keep": {"mixture": [{"keep": "some"}]},
        "loss_type": {"loss_type": "sample"},
        "input_tokens": {"input_tokens": 0},
        "sentinels": {"sentinels": 4},
        "mixture[0]": {"mixture": [{"input_alpha": {"tok_rgb": 1.0}, "target_alpha": 0}]},
    }
    for key, extra in cases.items():
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            fourm(root, **extra)
    objective = fourm(root, modalities={"tok_rgb": {"vocab_size": 1000, "grid": [4, 16]}})
    with pytest.raises(ValueError, match=r"grid"):
        objective(batches[0])


def write_config(path, root, emoji_shards, **objective) -> str:
    config = {
        "seed": 0, "steps": 4, "log": {"progress": False, "tensorboard": False},
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "data": {"shards": str(emoji_shards), "join": [str(root / "out" / "tok_rgb"), str(root / "out" / "tok_caption")],
                 "modalities": ["tok_rgb", "tok_caption"], "image_size": None, "batch_size": 8, "num_workers": 1},
        "objective": {"name": "4m", **SMALL, "modalities": modalities(root), "sentinels": SENTINELS,
                      "input_tokens": [8, 24], "target_tokens": [8, 24], **objective},
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_token_sets_from_another_tokenizer_or_missing_are_refused_before_training(tokenized_emoji, emoji_shards,
                                                                                   tmp_path):
    root, _ = tokenized_emoji
    other = export_tokenizer(tmp_path / "other", levels=[8, 5, 5, 5], width=16).parent  # other weights
    mods = modalities(root)
    cases = {
        "tok_rgb.tokenizer": {**mods, "tok_rgb": {**mods["tok_rgb"], "tokenizer": str(other)}},
        "tok_rgb.vocab_size": {**mods, "tok_rgb": {**mods["tok_rgb"], "vocab_size": 1024}},
        "tok_caption.grid": {**mods, "tok_caption": {"vocab_size": mods["tok_caption"]["vocab_size"], "grid": [4, 4]}},
        "tok_edges": {**mods, "tok_edges": {"vocab_size": 1000, "grid": [8, 8]}},
    }
    for key, mods_case in cases.items():
        cfg = load_pretrain_config(write_config(tmp_path / "c.yaml", root, emoji_shards, modalities=mods_case))
        objective = build_objective(cfg.objective)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            objective.check_run(cfg, 0)
    cfg = load_pretrain_config(write_config(tmp_path / "ok.yaml", root, emoji_shards))
    build_objective(cfg.objective).check_run(cfg, 0)


def test_zero3_bf16_two_ranks_resume_bitwise(tokenized_emoji, emoji_shards, data_root, tmp_path):
    from test_spark import copy_as_stopped_after_step_2, polymodal, start_event, step_losses

    root, _ = tokenized_emoji
    config = write_config(tmp_path / "4m.yaml", root, emoji_shards)

    def pretrain(run_dir, *extra):
        polymodal("pretrain", config, f"run_dir={run_dir}", "zero_stage=3", "precision=bf16", "checkpoint.every=2",
                  "checkpoint.keep=5", *extra, ranks=2)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    pretrain(whole, "log.images_every=4")
    assert sorted(p.name for p in (whole / "images").iterdir()) == ["step_0000004.json", "step_0000004.png"]
    start = start_event(whole)
    assert (start["world_size"], start["zero_stage"], start["precision"]) == (2, 3, "bf16")
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_tok_rgb" in row and "acc_tok_caption" in row for row in rows)
    copy_as_stopped_after_step_2(whole, resumed)
    pretrain(resumed, "resume=latest")
    assert step_losses(resumed) == step_losses(whole) and len(step_losses(whole)) == 4

    # `polymodal generate` on the trained run: text in, tokens through the run's tokenizers, PNG and text out.
    printed = polymodal("generate", str(whole), "--condition", "caption=grinning face", "--target", "rgb,caption",
                        "--schedule", "roar:4", "--cfg", "2", "--samples", "2", "--out", str(tmp_path / "gen"))
    result = json.loads(printed.splitlines()[-1])
    assert result["targets"] == ["tok_rgb", "tok_caption"] and len(result["texts"]["tok_caption"]) == 2
    from PIL import Image

    with Image.open(tmp_path / "gen" / "generated.png") as grid:
        assert grid.size[1] > grid.size[0] / 2  # two rows of one generated image each
    bad = subprocess.run(polymodal_cmd() + ["generate", str(whole), "--condition", "depth=x.png", "--target", "rgb"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "depth" in bad.stderr and "Traceback" not in bad.stderr

    # The standalone export carries the tokenizers: loaded from it, the model reads them from its own copies and
    # gives the run's features and generations; the tokens made by them are the run's.
    from polymodal.pretrain.export import load_exported
    from polymodal.tokenizers.registry import load

    polymodal("checkpoint", "export", str(whole), "--format", "standalone")
    alone = load_exported(whole / "standalone.safetensors")
    run = load_exported(whole / "model.safetensors")
    for name, m in alone.modality_configs.items():
        assert "polymodal-tokenizers-" in m.tokenizer and str(root) not in m.tokenizer
        assert load(m.tokenizer).fingerprint == load(run.modality_configs[name].tokenizer).fingerprint
    from conftest import cifar_test_images

    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = (cifar_test_images(data_root, 3, 32) * std + mean) * 2 - 1  # the tokenizers' [-1, 1]
    torch.testing.assert_close(alone.image_features(images), run.image_features(images))
    printed = polymodal("generate", str(whole / "standalone.safetensors"), "--condition", "caption=grinning face",
                        "--target", "caption", "--samples", "1", "--seed", "1", "--out", str(tmp_path / "gen2"))
    assert json.loads(printed.splitlines()[-1])["texts"]["tok_caption"]
