import json

import pytest
import torch

from ckptflow import data, seed
from ckptflow.errors import CkptError
from ckptflow.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    files, _ = seed.tokenizer_files(512)
    for name, body in files.items():
        (d / name).write_bytes(body)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    return load_tokenizer(str(d))


def jsonl(tmp_path, rows, name="d.jsonl") -> str:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def qa(n: int) -> list[dict]:
    return [{"prompt": f"Q: what is {i}?\nA:", "response": f" it is {i}."} for i in range(n)]


def test_read_examples_jsonl_and_plain_text(tmp_path):
    uri = jsonl(tmp_path, [{"text": "a b"}, {"prompt": "p", "response": "r"}])
    assert data.read_examples(uri) == [{"text": "a b"}, {"prompt": "p", "response": "r"}]
    txt = tmp_path / "t.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n")
    assert data.read_examples(str(txt)) == [{"text": "first doc\nline two"}, {"text": "second doc"}]


@pytest.mark.parametrize("line,needle", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ('{"prompt": "only a prompt"}', "d.jsonl:2: expected a string 'text'"),
    ('{"text": 3}', "d.jsonl:2"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, needle):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(CkptError, match=needle):
        data.read_examples(str(p))


def test_loss_only_on_the_response(tok):
    (ids, mask), = data.tokenize([{"prompt": "Q: hi\nA:", "response": " yes"}], tok)
    n_prompt = 1 + len(tok.encode("Q: hi\nA:"))
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert mask == [False] * n_prompt + [True] * (len(ids) - n_prompt)
    tokens, labels = data.collate([(ids, mask)], pad_id=0, seq_len=64)
    assert tokens[0].tolist() == ids[:-1]
    want = [t if m else data.IGNORE for t, m in zip(ids[1:], mask[1:])]
    assert labels[0].tolist() == want
    assert tok.decode([t for t in labels[0].tolist() if t != data.IGNORE]) == " yes"


def test_padding_is_ignored_and_width_is_the_longest_row():
    rows = [([1, 5, 6, 2], [False, True, True, True]), ([1, 7, 2], [False, True, True])]
    tokens, labels = data.collate(rows, pad_id=0, seq_len=16)
    assert tokens.tolist() == [[1, 5, 6], [1, 7, 0]]
    assert labels.tolist() == [[5, 6, 2], [7, 2, data.IGNORE]]


def test_pack_labels_every_token_but_the_first_exactly_once():
    rows = [(list(range(i * 10, i * 10 + 7)), [True] * 7) for i in range(5)]   # 35 tokens
    windows = data.pack(rows, [0, 1, 2, 3, 4], seq_len=8)
    assert all(len(ids) == 9 for ids, _ in windows) and len(windows) == 4
    labels = [t for ids, _ in windows for t in ids[1:]]
    stream = [t for ids, _ in rows for t in ids]
    assert labels == stream[1:33]


def test_batches_are_deterministic_and_resume_exactly(tok):
    rows = data.tokenize(qa(23), tok)
    make = lambda: data.Batches(rows, batch_size=4, seq_len=32, packed=False, seed=7, pad_id=0)
    a = make()
    seen = [a.next() for _ in range(9)]            # 5 batches per epoch: this crosses two epochs
    b = make()
    for _ in range(4):
        b.next()
    state = json.loads(json.dumps(b.state()))      # the position survives JSON
    c = make()
    c.load_state(state)
    for want in seen[4:]:
        got = c.next()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert c.state()["epoch"] == 1


def test_epochs_and_seeds_change_the_order(tok):
    rows = data.tokenize(qa(16), tok)
    first = lambda s: data.Batches(rows, batch_size=16, seq_len=32, packed=False, seed=s, pad_id=0).next()[0]
    assert not torch.equal(first(0), first(1))
    b = data.Batches(rows, batch_size=16, seq_len=32, packed=False, seed=0, pad_id=0)
    assert not torch.equal(b.next()[0], b.next()[0])


def test_packed_batches_are_full_rows(tok):
    b = data.Batches(data.tokenize(qa(40), tok), batch_size=3, seq_len=16, packed=True, seed=0, pad_id=0)
    tokens, labels = b.next()
    assert tokens.shape == (3, 16) and (labels != data.IGNORE).any()


def test_too_little_data_and_a_foreign_position_are_errors(tok):
    rows = data.tokenize(qa(3), tok)
    with pytest.raises(CkptError, match="fewer than batch_size 4"):
        data.Batches(rows, batch_size=4, seq_len=32, packed=False, seed=0, pad_id=0, where="d.jsonl").next()
    b = data.Batches(rows, batch_size=2, seq_len=32, packed=False, seed=0, pad_id=0)
    with pytest.raises(CkptError, match="saved data position is for 99 examples"):
        b.load_state({"epoch": 0, "index": 0, "seed": 0, "packed": False, "rows": 99})


def test_eval_batches_are_stable_and_eval_loss_is_mean_token_ce(tmp_path, tok):
    uri = jsonl(tmp_path, qa(10), "eval.jsonl")
    a = data.eval_batches(uri, tok, batch_size=4, seq_len=32)
    b = data.eval_batches(uri, tok, batch_size=4, seq_len=32, max_batches=2)
    assert len(a) == 3 and a[2][0].shape[0] == 2 and len(b) == 2
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))

    class Uniform(torch.nn.Module):   # logits all equal: the loss must be log(vocab)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, tokens):
            return torch.zeros(*tokens.shape, 512) + self.w

    out = data.eval_loss(Uniform(), a)
    assert out["loss"] == pytest.approx(torch.log(torch.tensor(512.0)).item(), abs=1e-5)
    assert out["tokens"] == sum(int((lab != data.IGNORE).sum()) for _, lab in a)
