"""scalora_dist.data: file formats, record formats, label masks, truncation, packing,
BatchLoader ordering / padding / resume, and error messages that name file and line."""

from __future__ import annotations

import copy
import itertools
import re

import datasets
import pytest
import torch
from helpers import write_json, write_jsonl, write_parquet, write_text

from scalora_dist.config import DataConfig
from scalora_dist.data import IGNORE_INDEX, BatchLoader, DataError, load_split
from scalora_dist.data import packing as data_mod

TEXTS = [
    "The fox lives in the forest.",
    "Anna takes a blue kite to the meadow on Sunday.",
    "The grey owl watches the clouds at night.",
    "Ben feeds fish to the otter after lunch.",
    "One rainy day Clara walked slowly to the river.",
]

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where does the fox live?"},
    {"role": "assistant", "content": "In the forest."},
    {"role": "user", "content": "And the owl?"},
    {"role": "assistant", "content": "In the valley."},
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def labelled_spans(ids, labels):
    """Runs of consecutive labelled tokens, as lists of ids."""
    runs = itertools.groupby(zip(ids, labels), key=lambda p: p[1] != IGNORE_INDEX)
    return [[i for i, _ in group] for is_label, group in runs if is_label]


def rows(ds):
    return [(r["input_ids"], r["labels"]) for r in ds]


# ---------------------------------------------------------------------------------------
# formats and file types


def test_text_jsonl(tmp_path, tok):
    f = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])
    ds = load_split(DataConfig(), tok, [str(f)])
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["input_ids", "labels", "length"]  # length: before any truncation
    assert len(ds) == len(TEXTS)
    for (ids, labels), text in zip(rows(ds), TEXTS):
        assert ids == [tok.bos_token_id] + enc(tok, text) + [tok.eos_token_id]
        assert labels == ids
        assert tok.decode(ids) == f"<|bos|>{text}<|eos|>"


def test_same_result_from_json_parquet_txt(tmp_path, tok):
    records = [{"text": t} for t in TEXTS]
    cfg = DataConfig()
    ref = rows(load_split(cfg, tok, [str(write_jsonl(tmp_path / "a.jsonl", records))]))
    as_json = load_split(cfg, tok, [str(write_json(tmp_path / "a.json", records))])
    as_parquet = load_split(cfg, tok, [str(write_parquet(tmp_path / "a.parquet", records))])
    # blank lines of a text file are skipped
    as_txt = load_split(cfg, tok, [str(write_text(tmp_path / "a.txt", TEXTS[:2] + ["", "  "] + TEXTS[2:]))])
    assert rows(as_json) == ref and rows(as_parquet) == ref and rows(as_txt) == ref


def test_multiple_files_keep_order_and_custom_field(tmp_path, tok):
    a = write_jsonl(tmp_path / "z.jsonl", [{"body": t} for t in TEXTS[:2]])
    b = write_jsonl(tmp_path / "a.jsonl", [{"body": t} for t in TEXTS[2:]])
    ds = load_split(DataConfig(text_field="body"), tok, [str(a), str(b)])
    assert [tok.decode(ids[1:-1]) for ids in ds["input_ids"]] == TEXTS


def test_instruction_masks_prompt(tmp_path, tok):
    recs = [
        {"prompt": "Q: Where does the fox live?\nA:", "response": " In the forest."},
        {"prompt": "", "response": "Just a response."},
    ]
    f = write_jsonl(tmp_path / "inst.jsonl", recs)
    ds = load_split(DataConfig(format="instruction"), tok, [str(f)])
    for (ids, labels), rec in zip(rows(ds), recs):
        prompt = [tok.bos_token_id] + enc(tok, rec["prompt"])
        response = enc(tok, rec["response"]) + [tok.eos_token_id]
        assert ids == prompt + response
        assert labels == [IGNORE_INDEX] * len(prompt) + response
        assert tok.decode([x for x in labels if x != IGNORE_INDEX]) == rec["response"] + "<|eos|>"


def test_chat_labels_only_assistant_turns(tmp_path, tok):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    ds = load_split(DataConfig(format="chat"), tok, [str(f)])
    (ids, labels), (ids2, labels2) = rows(ds)
    assert ids == enc(tok, tok.apply_chat_template(CHAT, tokenize=False))
    assert [tok.decode(s) for s in labelled_spans(ids, labels)] == [
        "In the forest.<|im_end|>\n",
        "In the valley.<|im_end|>\n",
    ]
    unlabelled = tok.decode([i for i, y in zip(ids, labels) if y == IGNORE_INDEX])
    assert "Be brief." in unlabelled and "And the owl?" in unlabelled
    assert "forest" not in unlabelled and "valley" not in unlabelled
    assert [tok.decode(s) for s in labelled_spans(ids2, labels2)] == ["In the forest.<|im_end|>\n"]
    assert tok.bos_token_id not in ids  # the template decides; no bos added


def test_chat_from_parquet_with_extra_keys(tmp_path, tok):
    msgs = [dict(m, name=None) for m in CHAT[1:3]]  # null keys are dropped before rendering
    f = write_parquet(tmp_path / "chat.parquet", [{"conv": msgs}])
    ds = load_split(DataConfig(format="chat", messages_field="conv"), tok, [str(f)])
    ids, labels = rows(ds)[0]
    assert [tok.decode(s) for s in labelled_spans(ids, labels)] == ["In the forest.<|im_end|>\n"]


def test_chat_needs_template(tmp_path, tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match="chat template"):
        load_split(DataConfig(format="chat"), plain, [str(f)])


def test_chat_rejects_non_incremental_template(tmp_path, tok):
    odd = copy.deepcopy(tok)
    # the generation prompt differs from how an assistant turn is rendered
    odd.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>bot\\n' }}{% endif %}"
    )
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: .*prefix"):
        load_split(DataConfig(format="chat"), odd, [str(f)])


# ---------------------------------------------------------------------------------------
# truncation and dropping


def test_truncation(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(TEXTS)}, {"text": "Hi."}])
    ds = load_split(DataConfig(max_length=8), tok, [str(f)])
    (ids, labels), (short, _) = rows(ds)
    full = [tok.bos_token_id] + enc(tok, " ".join(TEXTS)) + [tok.eos_token_id]
    assert ids == full[:8] and labels == ids
    assert len(short) < 8


def test_examples_without_labels_after_truncation_are_dropped(tmp_path, tok):
    long_prompt = " ".join(TEXTS)
    recs = [{"prompt": long_prompt, "response": "x"}, {"prompt": "Q:", "response": " yes"}]
    f = write_jsonl(tmp_path / "i.jsonl", recs)
    ds = load_split(DataConfig(format="instruction", max_length=16), tok, [str(f)])
    assert len(ds) == 1 and tok.decode(ds[0]["input_ids"]) == "<|bos|>Q: yes<|eos|>"
    g = write_jsonl(tmp_path / "all.jsonl", recs[:1])
    with pytest.raises(DataError, match=r"all\.jsonl: all 1 records were dropped"):
        load_split(DataConfig(format="instruction", max_length=16), tok, [str(g)])


def test_empty_texts_are_dropped(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": ""}, {"text": TEXTS[0]}, {"text": "  "}])
    assert len(load_split(DataConfig(), tok, [str(f)])) == 1


# ---------------------------------------------------------------------------------------
# packing


def _examples(packed_row):
    """Split a packed row back into its examples at the position restarts."""
    ids, labels, pos = packed_row["input_ids"], packed_row["labels"], packed_row["position_ids"]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
    return [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("map_batch", [1000, 3])  # 3: rows straddle map batches
def test_packing_keeps_whole_examples_in_order(tmp_path, tok, monkeypatch, map_batch):
    monkeypatch.setattr(data_mod, "MAP_BATCH", map_batch)
    texts = [t + f" {i}" for i, t in enumerate(TEXTS * 6)]
    f = write_jsonl(tmp_path / f"p{map_batch}.jsonl", [{"text": t} for t in texts])
    plain = load_split(DataConfig(max_length=64), tok, [str(f)])
    packed = load_split(DataConfig(max_length=40, packing=True), tok, [str(f)])
    assert packed.column_names == ["input_ids", "labels", "position_ids"]
    assert all(len(ids) <= 40 for ids in packed["input_ids"])
    assert len(packed) < len(plain)  # several examples share a row
    examples = [e for row in packed for e in _examples(row)]
    # every example whole, in file order, its first token no target (as unpacked: labels shift)
    assert [ids for ids, _ in examples] == plain["input_ids"]
    assert [labels for _, labels in examples] == [[IGNORE_INDEX] + y[1:] for y in plain["labels"]]
    assert all(row["position_ids"] == [p for ids, _ in _examples(row) for p in range(len(ids))] for row in packed)
    # next-fit: a row ends only where the next example would not fit
    lengths = [[len(ids) for ids, _ in _examples(row)] for row in packed]
    assert all(sum(row) + nxt[0] > 40 for row, nxt in zip(lengths, lengths[1:]))


def test_packing_keeps_label_masks_and_splits_long_examples(tmp_path, tok):
    recs = [{"prompt": f"Question {i}:", "response": f" answer {i}."} for i in range(12)]
    f = write_jsonl(tmp_path / "i.jsonl", recs)
    plain = load_split(DataConfig(format="instruction"), tok, [str(f)])
    packed = load_split(DataConfig(format="instruction", max_length=32, packing=True), tok, [str(f)])
    examples = [e for row in packed for e in _examples(row)]
    assert [labels for _, labels in examples] == [[IGNORE_INDEX] + y[1:] for y in plain["labels"]]
    # an example longer than max_length is cut into pieces, each on its own positions
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(TEXTS * 3)}, {"text": "Hi."}])
    whole = load_split(DataConfig(max_length=512), tok, [str(long)])["input_ids"]
    rows = load_split(DataConfig(max_length=16, packing=True), tok, [str(long)])
    pieces = [ids for row in rows for ids, _ in _examples(row)]
    assert all(len(p) <= 16 for p in pieces) and len(pieces) > 3
    assert [t for p in pieces for t in p] == whole[0] + whole[1]  # nothing lost


def test_packing_a_few_tokens_is_one_short_row(tmp_path, tok):
    f = write_jsonl(tmp_path / "small.jsonl", [{"text": "Hi."}])
    packed = load_split(DataConfig(max_length=64, packing=True), tok, [str(f)])
    assert len(packed) == 1 and len(packed[0]["input_ids"]) < 64


def test_packed_batches_carry_positions_and_no_attention_for_the_model(tmp_path, tok):
    from scalora_dist.data import count_tokens, model_inputs

    f = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in TEXTS])
    packed = load_split(DataConfig(max_length=24, packing=True), tok, [str(f)])
    batch = BatchLoader(packed, 2, tok.pad_token_id, shuffle=False).next_batch()
    inputs = model_inputs(batch)
    assert "attention_mask" not in inputs and inputs["position_ids"].shape == batch["input_ids"].shape
    lengths = [len(packed[i]["input_ids"]) for i in range(2)]
    for row, n in zip(inputs["position_ids"], lengths):  # padding is a sequence of its own
        assert row[n:].tolist() == list(range(len(row) - n))
    assert count_tokens([batch])[1] == sum(lengths)


# ---------------------------------------------------------------------------------------
# BatchLoader


def toy(n, min_len=1):
    """Example i has length min_len + i % 5 and tokens all equal to i + 10."""
    ids = [[i + 10] * (min_len + i % 5) for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": [[-100] + x[1:] for x in ids]})


def example_ids(batch):
    return [int(row[0]) - 10 for row in batch["input_ids"]]


def test_batch_padding_and_masks():
    ds = toy(10)
    loader = BatchLoader(ds, 4, pad_token_id=0, shuffle=False)
    batch = loader.next_batch()
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long and v.shape == (4, 4) for v in batch.values())
    for i in range(4):
        n = 1 + i % 5
        assert batch["input_ids"][i].tolist() == [i + 10] * n + [0] * (4 - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (4 - n)
        assert batch["labels"][i].tolist() == [-100] + [i + 10] * (n - 1) + [-100] * (4 - n)


def test_list_dataset_without_labels():
    loader = BatchLoader([{"input_ids": [5, 6]}, {"input_ids": [7]}], 2, pad_token_id=1)
    batch = loader.next_batch()
    assert sorted(batch["input_ids"].tolist()) == [[5, 6], [7, 1]]
    assert sorted(batch["labels"].tolist()) == [[5, 6], [7, -100]]


def test_order_deterministic_epochs_reshuffle():
    ds = toy(12)
    a = BatchLoader(ds, 3, 0, seed=7)
    b = BatchLoader(ds, 3, 0, seed=7)
    assert a.batches_per_epoch() == len(a) == 4
    epoch0 = [example_ids(batch) for batch in a]
    assert [example_ids(b.next_batch()) for _ in range(4)] == epoch0
    assert a.state_dict() == {"epoch": 1, "position": 0}
    epoch1 = [example_ids(batch) for batch in a]
    assert sorted(sum(epoch0, [])) == sorted(sum(epoch1, [])) == list(range(12))
    assert epoch0 != epoch1  # reshuffled with seed + epoch
    gen = torch.Generator().manual_seed(7 + 1)
    assert sum(epoch1, []) == torch.randperm(12, generator=gen).tolist()
    other = BatchLoader(ds, 3, 0, seed=8)
    assert [example_ids(batch) for batch in other] != epoch0
    plain = BatchLoader(ds, 3, 0, shuffle=False)
    assert sum((example_ids(batch) for batch in plain), []) == list(range(12))


def test_drop_last():
    ds = toy(10)
    assert [len(example_ids(b)) for b in BatchLoader(ds, 4, 0)] == [4, 4]
    loader = BatchLoader(ds, 4, 0, drop_last=False)
    sizes = [len(example_ids(b)) for b in loader]
    assert sizes == [4, 4, 2]


@pytest.mark.parametrize("n,b,world", [(24, 2, 2), (25, 3, 2), (30, 2, 3)])
def test_rank_split_matches_single_rank(n, b, world):
    ds = toy(n)
    single = BatchLoader(ds, b * world, 0, seed=3)
    ranks = [BatchLoader(ds, b, 0, seed=3, rank=k, world_size=world) for k in range(world)]
    steps = single.batches_per_epoch() * 2 + 1  # across epochs
    assert all(r.batches_per_epoch() == single.batches_per_epoch() for r in ranks)
    for _ in range(steps):
        whole = example_ids(single.next_batch())
        parts = [example_ids(r.next_batch()) for r in ranks]
        assert all(len(p) == b for p in parts)
        assert sum(parts, []) == whole  # same examples, and in rank order
    assert len({r.state_dict()["epoch"] for r in ranks}) == 1


def test_rank_split_without_drop_last_covers_everything():
    ds = toy(11)  # global batch 3 * 2 = 6: one full batch + 5 leftover (split 2 / 3)
    ranks = [BatchLoader(ds, 3, 0, shuffle=False, drop_last=False, rank=k, world_size=2) for k in range(2)]
    seen = [[example_ids(b) for b in r] for r in ranks]
    assert seen == [[[0, 1, 2], [6, 7]], [[3, 4, 5], [8, 9, 10]]]
    tiny = [
        BatchLoader(toy(10), 3, 0, shuffle=False, drop_last=False, rank=k, world_size=3) for k in range(3)
    ]  # one leftover example for three ranks
    assert [r.batches_per_epoch() for r in tiny] == [1, 1, 2]
    assert [example_ids(b) for b in tiny[2]] == [[6, 7, 8], [9]]


def test_state_dict_resume():
    ds = toy(10)
    loader = BatchLoader(ds, 3, 0, seed=1)  # 3 batches per epoch
    for _ in range(4):
        loader.next_batch()
    state = loader.state_dict()
    assert state == {"epoch": 1, "position": 1}
    expected = [loader.next_batch() for _ in range(6)]
    resumed = BatchLoader(ds, 3, 0, seed=1)
    resumed.load_state_dict(state)
    got = [resumed.next_batch() for _ in range(6)]
    for x, y in zip(expected, got):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # iterating from mid-epoch yields the rest of that epoch only
    again = BatchLoader(ds, 3, 0, seed=1)
    again.load_state_dict({"epoch": 0, "position": 2})
    assert len(list(again)) == 1 and again.state_dict() == {"epoch": 1, "position": 0}


def test_too_small_for_one_batch():
    with pytest.raises(DataError, match=r"5 examples.*global batch of 8 \(micro_batch_size 4 x 2 ranks\)"):
        BatchLoader(toy(5), 4, 0, world_size=2)
    with pytest.raises(DataError, match="2 examples"):
        BatchLoader(toy(2), 4, 0, drop_last=False, rank=0, world_size=3)


def test_real_split_batches(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    ds = load_split(DataConfig(), tok, [str(f)])
    batch = BatchLoader(ds, 2, tok.pad_token_id).next_batch()
    lengths = batch["attention_mask"].sum(1)
    for row, n in zip(batch["input_ids"], lengths):
        assert row[0] == tok.bos_token_id and row[n - 1] == tok.eos_token_id
        assert (row[n:] == tok.pad_token_id).all()


# ---------------------------------------------------------------------------------------
# errors name the file and the line


def expect_error(cfg, tok, files, pattern):
    with pytest.raises(DataError) as info:
        load_split(cfg, tok, [str(f) for f in files])
    message = str(info.value)
    assert re.search(pattern, message), message
    return message


def test_missing_and_mismatched_files(tmp_path, tok):
    expect_error(DataConfig(), tok, [tmp_path / "nope.jsonl"], r"nope\.jsonl: file not found")
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    b = write_text(tmp_path / "b.txt", ["x"])
    mixed = load_split(DataConfig(), tok, [str(a), str(b)])  # files of several types, in order
    assert len(mixed) == 2
    c = write_text(tmp_path / "c.csv", ["text", "x"])
    expect_error(DataConfig(), tok, [c], r"c\.csv: unsupported file type '\.csv'")
    expect_error(DataConfig(format="chat"), tok, [b], r"b\.txt: plain-text files only support")
    with pytest.raises(DataError, match="no data files"):
        load_split(DataConfig(), tok, [])


def test_empty_files(tmp_path, tok):
    expect_error(DataConfig(), tok, [write_text(tmp_path / "e.jsonl", [])], r"e\.jsonl: no records")
    expect_error(DataConfig(), tok, [write_text(tmp_path / "w.jsonl", ["", "  "])], r"w\.jsonl: no records")
    expect_error(DataConfig(), tok, [write_json(tmp_path / "a.json", [])], r"a\.json: no records")
    expect_error(DataConfig(), tok, [write_parquet(tmp_path / "p.parquet", [])], r"p\.parquet: no records")


def test_malformed_json_line(tmp_path, tok):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, "", '{"text": "b",}', {"text": "c"}])
    expect_error(DataConfig(), tok, [f], r"bad\.jsonl:3: not valid JSON \(")
    g = write_jsonl(tmp_path / "list.jsonl", [{"text": "a"}, "[1, 2]"])
    expect_error(DataConfig(), tok, [g], r"list\.jsonl:2: expected a JSON object, got list")


def test_malformed_json_array(tmp_path, tok):
    f = tmp_path / "bad.json"
    f.write_text('[\n {"text": "a"},\n {"text": "b"\n]\n')
    expect_error(DataConfig(), tok, [f], r"bad\.json:4: not valid JSON")


def test_missing_field_names_line_after_blank_lines(tmp_path, tok):
    f = write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, "", {"text": "b"}, {"body": "c"}])
    expect_error(DataConfig(), tok, [f], r"m\.jsonl:4: missing field 'text'")
    g = write_jsonl(tmp_path / "n.jsonl", [{"body": "a"}])  # column absent altogether
    expect_error(DataConfig(), tok, [g], r"n\.jsonl:1: missing field 'text'")


def test_error_in_second_file(tmp_path, tok):
    a = write_jsonl(tmp_path / "first.jsonl", [{"text": t} for t in TEXTS])
    b = write_jsonl(tmp_path / "second.jsonl", [{"text": "ok"}, {"text": None}])
    expect_error(DataConfig(), tok, [a, b], r"second\.jsonl:2: missing field 'text'")


def test_wrong_types(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": 5}])
    expect_error(DataConfig(), tok, [f], r"t\.jsonl:2: field 'text' must be a string, got int")
    g = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": "hello"}])
    expect_error(
        DataConfig(format="chat"), tok, [g], r"c\.jsonl:2: field 'messages' must be a list of \{role, content\} objects"
    )
    h = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user"}, CHAT[2]]}])
    expect_error(DataConfig(format="chat"), tok, [h], r"d\.jsonl:1: messages\[0\]: missing field 'content'")


def test_chat_without_assistant(tmp_path, tok):
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    expect_error(DataConfig(format="chat"), tok, [f], r"c\.jsonl:2: no assistant turn")
    g = write_jsonl(tmp_path / "first.jsonl", [{"messages": CHAT[2:]}])
    expect_error(DataConfig(format="chat"), tok, [g], r"first\.jsonl:1: .*starts with an assistant turn")


def test_instruction_empty_response(tmp_path, tok):
    f = write_jsonl(tmp_path / "i.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": " "}])
    expect_error(DataConfig(format="instruction"), tok, [f], r"i\.jsonl:2: field 'response' is empty")
    g = write_json(tmp_path / "i.json", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    expect_error(DataConfig(format="instruction"), tok, [g], r"i\.json: record 2: missing field 'response'")


def test_parquet_row(tmp_path, tok):
    f = write_parquet(tmp_path / "p.parquet", [{"text": "a"}, {"text": "b"}, {"text": None}])
    expect_error(DataConfig(), tok, [f], r"p\.parquet: row 3: missing field 'text'")


def test_tokenizer_without_eos(tmp_path, tok):
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="eos"):
        load_split(DataConfig(), no_eos, [str(f)])


# ---------------------------------------------------------------------------------------
# the shipped quickstart corpus


def test_quickstart_data_is_reproducible_and_loads(tok):
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("mkdata", root / "tools" / "generators" / "make_quickstart_data.py")
    mkdata = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mkdata)
    train_file = root / "configs" / "data" / "quickstart_train.jsonl"
    eval_file = root / "configs" / "data" / "quickstart_eval.jsonl"
    shipped_train = [json.loads(line)["text"] for line in train_file.read_text().splitlines()]
    shipped_eval = [json.loads(line)["text"] for line in eval_file.read_text().splitlines()]
    train, evals = mkdata.generate(len(shipped_train), len(shipped_eval))
    assert (train, evals) == (shipped_train, shipped_eval)  # regenerating gives the same files
    assert len(train) == 3000 and len(evals) == 300 and not set(train) & set(evals)
    assert all(20 <= len(t.split()) <= 60 for t in train + evals)
    assert train_file.stat().st_size + eval_file.stat().st_size < 1_000_000
    ds = load_split(DataConfig(max_length=128), tok, [str(eval_file)])
    assert len(ds) == 300
