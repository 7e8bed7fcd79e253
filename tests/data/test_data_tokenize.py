"""Records -> tokens: masks cover exactly the completion (checked by decoding), templates, truncation."""

from __future__ import annotations

import logging

import pytest
from _tok import BROKEN_TEMPLATE, make_tokenizer

from lightning_rlhf.data import ChatTemplateError, DataFormatError, Where, tokenize_records

TOK = make_tokenizer()
U = [{"role": "user", "content": "What is two plus two?"}]


def run(records, kind, **kw):
    return tokenize_records(records, [Where("f.jsonl", i, i + 1) for i in range(len(records))], kind, TOK, **kw)


def masked_text(ex):
    return TOK.decode([t for t, m in zip(ex["input_ids"], ex["loss_mask"], strict=True) if m])


def test_text_record_trains_on_all_tokens_but_bos():
    (ex,), _ = run([{"text": "Hello there"}], "sft")
    assert TOK.decode(ex["input_ids"]) == "<s>Hello there</s>"
    assert ex["loss_mask"][0] == 0 and masked_text(ex) == "Hello there</s>"


def test_prompt_completion_mask_is_completion_plus_eos():
    (ex,), _ = run([{"prompt": "The answer is", "completion": " 4."}], "sft")
    assert TOK.decode(ex["input_ids"]) == "<s>The answer is 4.</s>"
    assert masked_text(ex) == " 4.</s>"
    # EOS already there: not doubled.
    (ex,), _ = run([{"prompt": "The answer is", "completion": " 4.</s>"}], "sft")
    assert masked_text(ex) == " 4.</s>"


def test_completion_only_loss_off_covers_every_token_but_first():
    (ex,), _ = run([{"prompt": "The answer is", "completion": " 4."}], "sft", completion_only_loss=False)
    assert ex["loss_mask"] == [0] + [1] * (len(ex["input_ids"]) - 1)


def test_conversational_prompt_completion_applies_chat_template():
    rec = {"prompt": U, "completion": [{"role": "assistant", "content": "The answer is 4."}]}
    (ex,), _ = run([rec], "sft")
    assert TOK.decode(ex["input_ids"]) == TOK.apply_chat_template(U + rec["completion"], tokenize=False)
    assert masked_text(ex) == "The answer is 4.</s>\n"


def test_messages_masks_every_assistant_turn():
    msgs = [{"role": "system", "content": "Be nice."}, *U, {"role": "assistant", "content": "4."},
            {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "How are you?"}]
    (ex,), _ = run([{"messages": msgs}], "sft")
    assert TOK.decode(ex["input_ids"]) == TOK.apply_chat_template(msgs, tokenize=False)
    assert masked_text(ex) == "4.</s>\nHow are you?</s>\n"


def test_broken_chat_template_raises_clear_error():
    tok = make_tokenizer(BROKEN_TEMPLATE)
    rec = {"prompt": U, "completion": [{"role": "assistant", "content": "4."}]}
    with pytest.raises(ChatTemplateError, match="record 0 .*not a prefix of its rendering of the full conversation"):
        tokenize_records([rec], [Where("f.jsonl", 0, 1)], "sft", tok, on_bad_record="skip")


@pytest.mark.parametrize("conversational", [False, True])
def test_preference_shares_the_prompt(conversational):
    if conversational:
        rec = {"prompt": U, "chosen": [{"role": "assistant", "content": "4."}],
               "rejected": [{"role": "assistant", "content": "5."}], "margin": 1.5}
        want_c, want_r = "4.</s>\n", "5.</s>\n"
    else:
        rec = {"chosen": "The answer is 4.", "rejected": "The answer is 5.", "margin": 1.5}
        want_c, want_r = " 4.</s>", " 5.</s>"
    (ex,), _ = run([rec], "preference")
    assert TOK.decode(ex["chosen_ids"]) == want_c and TOK.decode(ex["rejected_ids"]) == want_r
    if conversational:
        assert TOK.decode(ex["prompt_ids"]) == TOK.apply_chat_template(U, tokenize=False, add_generation_prompt=True)
    else:
        assert TOK.decode(ex["prompt_ids"]) == "<s>The answer is"
    assert ex["margin"] == 1.5 and ex["index"] == 0


def test_prompt_kind_uses_generation_prompt_and_keeps_extra():
    (ex,), _ = run([{"prompt": U, "answer": 4}], "prompt")
    assert ex["prompt_text"].endswith("<|assistant|>\n") and TOK.decode(ex["prompt_ids"]) == ex["prompt_text"]
    assert ex["extra"] == {"answer": 4} and ex["prompt"] == U


LONG = {"prompt": "The answer is", "completion": " 4. The sea is blue and deep and wide."}


def test_truncation_error_names_record_and_limit():
    with pytest.raises(DataFormatError, match=r"record 1 \(line 2\): field 'completion' is too long: \d+ tokens > max_length=8"):
        run([{"text": "Hi"}, LONG], "sft", max_length=8)


def test_truncation_skip_counts_and_logs_once(caplog):
    with caplog.at_level(logging.WARNING):
        examples, stats = run([{"text": "Hi"}, LONG, LONG], "sft", max_length=8, truncation="skip")
    assert len(examples) == 1 and stats["skipped_too_long"] == 2 and stats["truncated"] == 0
    assert [r.getMessage() for r in caplog.records] == ["data: 2 of 3 records skipped as too long (max_length=8, max_prompt_length=256)"]


def test_truncation_truncate_cuts_completion_end():
    (ex,), stats = run([LONG], "sft", max_length=8, truncation="truncate")
    assert len(ex["input_ids"]) == 8 and stats["truncated"] == 1
    assert TOK.eos_token_id not in ex["input_ids"]  # a cut completion does not end with EOS
    assert TOK.decode(ex["input_ids"]).startswith("<s>The answer is")
    # A prompt that fills max_length leaves nothing to learn: skipped and counted.
    _, stats = run([LONG], "sft", max_length=2, truncation="truncate")
    assert stats["skipped_too_long"] == 1


def test_truncation_of_preference_and_prompt_keeps_prompt_end():
    rec = {"prompt": "Once upon a time there was a tiny model", "chosen": " that learned.", "rejected": " The sea."}
    (ex,), stats = run([rec], "preference", max_length=9, max_prompt_length=4, truncation="truncate")
    assert TOK.decode(ex["prompt_ids"]).endswith(" tiny model") and len(ex["prompt_ids"]) == 4
    assert len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) <= 9
    assert stats["truncated"] == 1
    (ex,), stats = run([{"prompt": rec["prompt"]}], "prompt", max_prompt_length=3, truncation="truncate")
    assert TOK.decode(ex["prompt_ids"]).endswith(" tiny model") and stats["truncated"] == 1
    with pytest.raises(DataFormatError, match="field 'prompt' is too long"):
        run([{"prompt": rec["prompt"]}], "prompt", max_prompt_length=3)


def test_bad_records_skip_policy_counts():
    recs = [{"prompt": "p", "chosen": " a", "rejected": " b"}, {"prompt": "p", "chosen": " a", "rejected": " a"},
            {"prompt": "p", "chosen": " a"}]
    examples, stats = run(recs, "preference", on_bad_record="skip")
    assert len(examples) == 1 and stats["skipped_bad"] == 2
    with pytest.raises(DataFormatError, match=r"record 1 \(line 2\): field 'rejected' is identical"):
        run(recs, "preference")


def test_demo_tokenizer_round_trip():
    from transformers import AutoTokenizer

    from lightning_rlhf.demo.assets import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    msgs = [{"role": "user", "content": tok.convert_ids_to_tokens(10)}, {"role": "assistant", "content": tok.convert_ids_to_tokens(11)}]
    (ex,), _ = tokenize_records([{"messages": msgs}], [Where("f", 0)], "sft", tok)
    masked = [t for t, m in zip(ex["input_ids"], ex["loss_mask"], strict=True) if m]
    assert masked[-1] == tok.eos_token_id and tok.convert_ids_to_tokens(masked[0]) == msgs[1]["content"]
