"""Data by hub name and in the hub's layouts: local dataset folders (Parquet shards + a README
declaring configs), hub dataset ids resolved offline from huggingface_hub's cache, and the
usual column shapes (alpaca, ShareGPT) with errors that name the dataset, row and field."""

from __future__ import annotations

import pytest
from helpers import put_in_hub_cache, write_dataset_repo, write_jsonl

from scalora_dist.config import DataConfig, DataSource, load_config
from scalora_dist.data import IGNORE_INDEX, DataError, load_split

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5."},
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi?"},
            {"from": "gpt", "value": "Hello."},
        ]
    },
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def labelled_text(tok, ds):
    return [tok.decode([t for t, y in zip(r["input_ids"], r["labels"]) if y != IGNORE_INDEX]) for r in ds]


def test_local_dataset_folder_with_splits_configs_and_shards(tmp_path, tok):
    texts = [{"text": f"The fox number {i} runs."} for i in range(10)]
    repo = write_dataset_repo(
        tmp_path / "repo", {"train": texts, "test": texts[:3]}, configs={"alpaca": {"train": ALPACA}}
    )
    train = load_split(DataConfig(), tok, [str(repo)])
    assert [tok.decode(r["input_ids"][1:-1]) for r in train] == [t["text"] for t in texts]  # shard order kept
    test = load_split(DataConfig(), tok, [DataSource(path=str(repo), split="test")])
    assert len(test) == 3
    sliced = load_split(DataConfig(), tok, [DataSource(path=str(repo), split="train[:40%]")])
    assert len(sliced) == 4
    alpaca = load_split(DataConfig(format="alpaca"), tok, [DataSource(path=str(repo), name="alpaca")])
    assert labelled_text(tok, alpaca) == ["Blue.<|im_end|>\n", "5.<|im_end|>\n"]
    with pytest.raises(DataError, match=r"repo\[validation\]: .*validation"):
        load_split(DataConfig(), tok, [DataSource(path=str(repo), split="validation")])


def test_hub_dataset_id_offline_from_the_cache(tmp_path, tok, monkeypatch):
    repo = write_dataset_repo(tmp_path / "repo", {"train": [{"text": f"Owl {i}."} for i in range(4)]})
    put_in_hub_cache(tmp_path / "hf", "someone/owls", repo, repo_type="dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    ds = load_split(DataConfig(), tok, ["someone/owls"])
    assert len(ds) == 4
    with pytest.raises(
        DataError,
        match=r"someone/missing: not a local file or folder .*not a dataset in the "
        r"Hugging Face cache.*hf download --repo-type dataset someone/missing",
    ):
        load_split(DataConfig(), tok, ["someone/missing"])
    # the long form in a config, with the slicing syntax
    cfg = load_config(
        None, ["model.path=m", "train.max_steps=1", 'data.train_files=[{path: someone/owls, split: "train[:50%]"}]']
    )
    assert len(load_split(cfg.data, tok, cfg.data.train_files)) == 2


def test_alpaca_and_sharegpt_columns(tmp_path, tok):
    f = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    with_template = load_split(DataConfig(format="alpaca"), tok, [str(f)])
    assert "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>" in tok.decode(with_template[1]["input_ids"])
    assert labelled_text(tok, with_template) == ["Blue.<|im_end|>\n", "5.<|im_end|>\n"]
    plain_tok = type(tok).from_pretrained(tok.name_or_path)
    plain_tok.chat_template = None  # a base model's tokenizer: Alpaca's own prompt text
    no_template = load_split(DataConfig(format="alpaca"), plain_tok, [str(f)])
    text = plain_tok.decode(no_template[1]["input_ids"])
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5." in text
    assert labelled_text(plain_tok, no_template)[0] == "Blue.<|eos|>"
    g = write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT)
    chat = load_split(DataConfig(format="sharegpt"), tok, [str(g)])
    assert tok.decode(chat[0]["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?")
    assert labelled_text(tok, chat) == ["Hello.<|im_end|>\n"]


def test_column_errors_name_the_source_row_and_field(tmp_path, tok):
    bad_alpaca = write_jsonl(tmp_path / "a.jsonl", [ALPACA[0], {"instruction": "x", "input": ""}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: missing field 'output'"):
        load_split(DataConfig(format="alpaca"), tok, [str(bad_alpaca)])
    bad_turn = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]}]
    g = write_jsonl(tmp_path / "s.jsonl", SHAREGPT + bad_turn)
    with pytest.raises(DataError, match=r"s\.jsonl:2: conversations\[1\]: 'from' is 'bot'"):
        load_split(DataConfig(format="sharegpt"), tok, [str(g)])
    repo = write_dataset_repo(tmp_path / "repo", {"train": [{"text": "ok"}, {"text": "ok"}, {"body": "x"}]}, shards=1)
    with pytest.raises(DataError, match=r"repo\[train\]: row 3: missing field 'text'"):
        load_split(DataConfig(), tok, [str(repo)])
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_split(DataConfig(), tok, [str(tmp_path / "nope.jsonl")])
