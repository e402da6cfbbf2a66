"""The Task protocol without Flower: completion-only masking, chat templates, formats, losses, partitions."""

import json

import pytest
import torch

from fedadapt.data import DataError, read_examples, read_labels
from fedadapt.models import load_model, load_tokenizer
from fedadapt.partitions import partition_examples
from fedadapt.tasks import build_task
from protocols.config import load_config

from .conftest import REPO

TINY = REPO / "simulations" / "configs" / "tiny.toml"


def _cfg(*overrides):
    return load_config(TINY, list(overrides))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


def _write(tmp_path, rows, name="train.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_completion_only_masking_scores_the_response_alone(tok, tmp_path):
    task = build_task(_cfg("task=instruct", "data.max_length=256"), [], tok)
    ex = task.parse({"instruction": "Name a colour.", "input": "", "output": "Blue sky"}, "x:1")
    ids, labels = task.encode_example(ex)
    scored = [i for i, lab in zip(ids, labels) if lab != -100]
    assert scored and all(lab in (-100, i) for i, lab in zip(ids, labels))
    text = tok.decode(scored)
    assert text.startswith("Blue sky") and "Name a colour" not in text  # the end-of-turn marker is scored too
    first = labels.index(next(lab for lab in labels if lab != -100))
    assert "Name a colour" in tok.decode(ids[:first])  # every prompt token before it carries no loss
    # multi-turn chat: both assistant turns are scored, the user turns are not
    chat = task.parse({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                                    {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye now"}]}, "x:2")
    ids, labels = task.encode_example(chat)
    text = tok.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert "Hello there" in text and "Goodbye now" in text and "Bye\n" not in text and "Hi" not in text


def test_prompt_tokens_carry_no_loss_gradient(tok):
    cfg = _cfg("task=instruct", "data.max_length=128")
    task = build_task(cfg, [], tok)
    model, _, _ = load_model("tiny-llama")
    ex = task.parse({"instruction": "Say yes.", "output": "yes"}, "x:1")
    batch = task.collate([ex])
    emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits
    from fedadapt.tasks.base import per_example_token_loss

    total, count = per_example_token_loss(out, batch["labels"])
    (total / count).sum().backward()
    first_scored = int((batch["labels"][0] != -100).nonzero()[0])
    # a causal LM: the loss reaches positions before the response only through attention, so the *targets*
    # are what is masked: changing a prompt token's label can not change the loss
    altered = batch["labels"].clone()
    altered[0, : first_scored] = -100
    assert torch.equal(altered, batch["labels"])
    assert count.item() == int((batch["labels"][0, 1:] != -100).sum())


def test_chat_template_is_the_tokenizers_own_else_the_default(tok):
    ex_obj = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    auto = build_task(_cfg("task=instruct"), [], tok)
    assert auto.template_used == "tokenizer"
    assert "<|im_start|>assistant" in auto.render(auto.parse(ex_obj, "x").messages, generation_prompt=False)
    default = build_task(_cfg("task=instruct", "instruct.chat_template=default"), [], tok)
    assert default.template_used == "default"
    text = default.render(default.parse(ex_obj, "x").messages, generation_prompt=False)
    assert text.startswith("### User:\n2+2?\n\n### Assistant:\n4")
    assert default.render([("user", "2+2?")], generation_prompt=True).endswith("### Assistant:\n")
    # a tokenizer without a chat template uses its family's, recognised by the turn markers in its vocabulary
    bare = load_tokenizer("tiny-llama")
    bare.chat_template = None
    fam = build_task(_cfg("task=instruct"), [], bare)
    assert fam.template_used == "chatml"  # SmolLM2's vocabulary has ChatML's markers
    text = fam.render(fam.parse(ex_obj, "x").messages, generation_prompt=False)
    assert text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    ids, labels = fam.encode_example(fam.parse(ex_obj, "x"))
    assert bare.decode([i for i, lab in zip(ids, labels) if lab != -100]) == "4<|im_end|>"
    assert fam._stop_ids() == [bare.eos_token_id, bare.convert_tokens_to_ids("<|im_end|>")]
    assert build_task(_cfg("task=instruct", "instruct.chat_template=family"), [], tok).template_used == "chatml"


def test_gemma_family_template_folds_the_system_message_and_stops_at_end_of_turn():
    from transformers import AutoTokenizer

    from fedadapt.models import _tokenizer_dir

    g = AutoTokenizer.from_pretrained(_tokenizer_dir())  # its own copy: tokens are added below
    g.chat_template = None
    g.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    task = build_task(_cfg("task=instruct", "instruct.system='Be brief.'"), [], g)
    assert task.template_used == "gemma"
    ex = task.parse({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}, "x")
    text = task.render(task._with_system(ex.messages), generation_prompt=False)
    assert text == (f"{g.bos_token}<start_of_turn>user\nBe brief.\n\n2+2?<end_of_turn>\n"
                    "<start_of_turn>model\n4<end_of_turn>\n")
    assert task.render([("user", "hi")], generation_prompt=True).endswith("<start_of_turn>model\n")
    ids, labels = task.encode_example(ex)
    assert g.decode([i for i, lab in zip(ids, labels) if lab != -100]) == "4<end_of_turn>"
    assert g.convert_tokens_to_ids("<end_of_turn>") in task._stop_ids()


def test_the_default_template_adds_bos_when_the_tokenizer_encodes_with_it(tok):
    class GemmaLike:  # Gemma's converted tokenizer: add_bos_token False, yet its post-processor adds <bos>
        bos_token_id, add_bos_token = 2, False

        def __call__(self, text, **kw):
            return {"input_ids": [2, 7]}

    task = build_task(_cfg("task=instruct", "instruct.chat_template=default"), [], tok)
    assert task._bos() == []  # SmolLM2's tokenizer adds no BOS
    task.tokenizer = GemmaLike()
    assert task._bos() == [2]


def test_classification_rows_become_questions_with_label_word_answers(tok):
    task = build_task(_cfg("task=instruct"), ["negative", "positive"], tok)
    ex = task.parse({"text": "A lovely film.", "label": "positive"}, "x:1")
    assert ex.messages[0][0] == "user" and "A lovely film." in ex.messages[0][1]
    assert "negative or positive" in ex.messages[0][1] and ex.messages[-1] == ("assistant", "positive")


@pytest.mark.parametrize("row, message", [
    ({"instruction": "Do it"}, "missing field 'output'"),
    ({"instruction": "Do it", "output": "  "}, "empty response"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
    ({"messages": "hello"}, "non-empty list"),
    ({"prompt": "x", "completion": "y"}, "not an instruction line"),
])
def test_instruct_format_errors_name_file_line_and_fix(tmp_path, row, message):
    task = build_task(_cfg("task=instruct"), [])
    p = _write(tmp_path, [{"instruction": "ok", "output": "fine"}, row])
    with pytest.raises(DataError, match=message) as e:
        read_examples(p, task)
    assert f"{p}:2" in str(e.value) and "\n" not in str(e.value)


def test_wrong_format_for_the_task_and_broken_files_are_one_line(tmp_path):
    alpaca = _write(tmp_path, [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="missing field 'text'"):
        read_examples(alpaca, build_task(_cfg(), ["negative", "positive"]))  # classify on instruction data
    with pytest.raises(DataError, match="missing field 'text'.*task = \"lm\""):
        read_examples(alpaca, build_task(_cfg("task=lm")))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n\xff\xfe\x00garbage\n')
    with pytest.raises(DataError, match=r"bin.jsonl:2: not UTF-8"):
        read_examples(binary, build_task(_cfg("task=lm")))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes('\ufeff{"text": "with a byte order mark"}\n'.encode("utf-8"))
    assert read_examples(bom, build_task(_cfg("task=lm")))[0].text == "with a byte order mark"
    (tmp_path / "labels.json").write_text('["a", "b", "a"]')
    with pytest.raises(DataError, match="duplicate label names"):
        read_labels(tmp_path)
    odd = _write(tmp_path, [{"text": "x", "label": ["a"]}], "odd.jsonl")
    with pytest.raises(DataError, match="unknown label a list"):
        read_examples(odd, build_task(_cfg(), ["a", "b"]))


def test_lm_loss_and_perplexity_on_a_tiny_model(tok):
    task = build_task(_cfg("task=lm", "data.max_length=32"), [], tok)
    model, _, _ = load_model("tiny-llama")
    rows = [task.parse({"text": t}, "x") for t in ("the cat sat on the mat", "a much longer line " * 40)]
    batch = task.collate(rows)
    assert batch["input_ids"].shape[1] == 32  # cut to max_length
    per = task.per_example_loss(model, batch)
    assert per.shape == (2,) and torch.isfinite(per).all()
    ev = task.evaluate(model, rows, batch_size=2)
    assert ev["perplexity"] == pytest.approx(torch.exp(torch.tensor(ev["loss"])).item(), rel=1e-4)
    assert ev["perplexity"] > 1000  # a random model over a 49k vocabulary


def test_instruct_evaluation_generates_and_scores(tok):
    cfg = _cfg("task=instruct", "instruct.generate_examples=2", "instruct.max_new_tokens=3", "instruct.samples=1")
    task = build_task(cfg, ["negative", "positive"], tok)
    model, _, _ = load_model("tiny-llama")
    rows = [task.parse({"text": "good", "label": "positive"}, "x"), task.parse({"text": "bad", "label": "negative"}, "x")]
    samples = []
    ev = task.evaluate(model, rows, batch_size=2, samples_out=samples)
    assert {"perplexity", "loss", "exact_match", "contains", "rougeL"} <= set(ev) and ev["generated"] == 2
    assert 0 <= ev["rougeL"] <= 1 and len(samples) == 1 and samples[0]["reference"] == "positive"


def test_field_partitioner_gives_each_value_to_one_owner(tmp_path):
    rows = [{"text": f"row {i}", "label": lab} for i, lab in enumerate(["a", "b", "c", "a", "b", "c", "d"])]
    p = _write(tmp_path, rows)
    task = build_task(_cfg("task=lm"))
    examples = read_examples(p, task, group_field="label")
    one_each = [partition_examples(examples, "field", 4, i) for i in range(4)]
    assert [sorted({e.group for e in part}) for part in one_each] == [["a"], ["b"], ["c"], ["d"]]
    two = [partition_examples(examples, "field", 2, i) for i in range(2)]  # round-robin in sorted order
    assert [sorted({e.group for e in part}) for part in two] == [["a", "c"], ["b", "d"]]
    with pytest.raises(DataError, match="4 distinct values but federation.num_clients is 5"):
        partition_examples(examples, "field", 5, 0)
    with pytest.raises(Exception, match="needs data.field"):
        _cfg("data.partitioner=field")


def test_methods_refuse_tasks_they_cannot_train():
    with pytest.raises(Exception, match="trainer 'dpopt' supports task classify only.*set task"):
        _cfg("trainer=dpopt", "task=lm")
    with pytest.raises(Exception, match="trainer 'sfprompt' supports task classify only"):
        _cfg("trainer=sfprompt", "task=instruct")


def test_scoring_only_response_positions_equals_the_full_softmax(tok):
    from fedadapt.tasks.base import per_example_token_loss, scored_token_loss

    task = build_task(_cfg("task=instruct", "data.max_length=96"), [], tok)
    model, _, _ = load_model("tiny-llama")
    rows = [task.parse({"instruction": "Say yes.", "output": "yes"}, "x"),
            task.parse({"instruction": "Name three colours please, in order.", "output": "red, green and blue"}, "x")]
    batch = task.collate(rows)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want_total, want_count = per_example_token_loss(full, batch["labels"])
    got_total, got_count = scored_token_loss(model, batch)
    assert torch.equal(got_count, want_count) and torch.allclose(got_total, want_total, atol=1e-4)


def test_huge_numbers_and_huge_lines_are_one_line_or_bounded(tmp_path, tok):
    p = tmp_path / "big.jsonl"
    p.write_text('{"text": "x", "label": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match="big.jsonl:1: bad JSON"):
        read_examples(p, build_task(_cfg(), ["a", "b"]))
    task = build_task(_cfg(), ["a", "b"], tok)
    huge = task.parse({"text": "word " * 1_000_000, "label": "a"}, "x")  # a 5 MB line
    seen = []
    real = task.tokenizer.__class__.__call__
    task.tokenizer.__class__.__call__ = lambda self, text, *a, **k: (seen.append(len(text)), real(self, text, *a, **k))[1]
    try:
        batch = task.collate([huge])
    finally:
        task.tokenizer.__class__.__call__ = real
    assert batch["input_ids"].shape[1] <= task.max_length
    assert max(seen) < 100 * task.max_length  # cut by characters first: never the 5 MB tokenized whole
