"""models.loader: config-only builds, LoRA, 4-bit, gradient checkpointing, export, reward heads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_rlhf.models import (
    LoraSpec,
    ModelSpec,
    as_spec,
    is_peft,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    save_pretrained,
)


def _ids(tok, texts=("review the phone . the phone is great .", "i love this lamp .")):
    enc = tok(list(texts), add_special_tokens=False, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_config_only_folder_is_built_deterministically(tiny_config_dir):
    rng_before = torch.random.get_rng_state()
    a = _state(load_causal_lm(str(tiny_config_dir)))
    b = _state(load_causal_lm(ModelSpec(path=str(tiny_config_dir), seed=0)))
    c = _state(load_causal_lm(ModelSpec(path=str(tiny_config_dir), seed=1)))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is left alone
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith("proj.weight")]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)


def test_shipped_demo_base_loads(demo_dir, demo_tokenizer):
    model = load_causal_lm(str(demo_dir), trainable=False)
    assert model.config.vocab_size == len(demo_tokenizer)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids, mask = _ids(demo_tokenizer)
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (*ids.shape, len(demo_tokenizer))


def test_weights_folder_loads_its_weights(tiny_model_dir):
    ours = load_causal_lm(str(tiny_model_dir))
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    sa, sr = ours.state_dict(), ref.state_dict()
    assert all(torch.equal(sa[k], sr[k]) for k in sr)
    assert ours.training and all(p.requires_grad for p in ours.parameters())


def test_dtype(tiny_config_dir):
    model = load_causal_lm(ModelSpec(path=str(tiny_config_dir), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_as_spec_from_dict_and_str():
    spec = as_spec({"path": "x", "lora": {"r": 4, "alpha": 8}, "quantization": "4bit"})
    assert spec.lora == LoraSpec(r=4, alpha=8) and spec.quantization == "4bit"
    assert as_spec("some/dir") == ModelSpec(path="some/dir")


def test_lora_spec_trains_only_the_adapter(tiny_model_dir):
    model = load_causal_lm(ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8)))
    assert is_peft(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert any("embed_tokens" in n for n in frozen) and any("q_proj.base_layer" in n for n in frozen)
    # all-linear: every projection of every layer is adapted (not lm_head)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_frozen_load_ignores_lora(tiny_model_dir):
    model = load_causal_lm(ModelSpec(path=str(tiny_model_dir), lora=LoraSpec()), trainable=False)
    assert not is_peft(model) and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def _train_steps(model, ids, mask, n=2, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        opt.step()
        opt.zero_grad()


def test_4bit_lora_loads_linear4bit_and_trains_the_adapter(tiny_model_dir, demo_tokenizer, tmp_path):
    import bitsandbytes as bnb

    model = load_causal_lm(
        ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8), quantization="4bit")
    )
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert n4 == 2 * 7  # every projection of both layers
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    frozen_before = _state(model)
    ids, mask = _ids(demo_tokenizer)
    # two steps: lora_B starts at 0, so lora_A's gradient is 0 until B has moved
    _train_steps(model, ids, mask, n=2)
    after = dict(model.named_parameters())
    unchanged = [n for n in before if torch.equal(before[n], after[n].detach())]
    assert not unchanged
    frozen_after = model.state_dict()
    assert all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before if "lora_" not in k)
    # a quantized base cannot be merged: the adapter folder is written
    out = save_pretrained(model, tmp_path / "qlora", demo_tokenizer)
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()


def test_quantization_without_lora_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="LoRA"):
        load_causal_lm(ModelSpec(path=str(tiny_model_dir), quantization="4bit"))


def test_missing_folder_is_a_clear_error_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_causal_lm(str(tmp_path / "nope"))
    # a Hub id is looked up in the HF cache only (HF_HUB_OFFLINE=1 in tests): one clear error (tests/test_hub.py)
    with pytest.raises(ValueError, match="'meta-llama/Llama-3.2-1B': not a local folder.*HF_HUB_OFFLINE=1"):
        load_causal_lm("meta-llama/Llama-3.2-1B")
    with pytest.raises(ValueError, match="path is empty"):
        load_causal_lm(ModelSpec())


def _randomise_lora_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_merged_lora_export_loads_with_transformers_and_matches(tiny_model_dir, demo_tokenizer, tmp_path):
    model = load_causal_lm(ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8)))
    _randomise_lora_b(model)  # lora_B = 0 would make the merge a no-op
    model.eval()
    ids, mask = _ids(demo_tokenizer)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))(
            input_ids=ids, attention_mask=mask
        ).logits
    assert not torch.allclose(want, base, atol=1e-3)

    out = save_pretrained(model, tmp_path / "merged", demo_tokenizer)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert is_peft(model)  # the trained module is not merged in place
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tok = load_tokenizer(out)
    assert tok.get_vocab() == demo_tokenizer.get_vocab() and tok.chat_template == demo_tokenizer.chat_template


def test_adapter_export_loads_with_peft_and_matches(tiny_model_dir, demo_tokenizer, tmp_path):
    from peft import PeftModel

    model = load_causal_lm(ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8)))
    _randomise_lora_b(model, seed=1)
    model.eval()
    out = save_pretrained(model, tmp_path / "adapter", merge_lora=False)
    assert (out / "adapter_config.json").exists()
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out)
    ).eval()
    ids, mask = _ids(demo_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, attention_mask=mask).logits,
            model(input_ids=ids, attention_mask=mask).logits,
        )


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, demo_tokenizer):
    ids, mask = _ids(demo_tokenizer)
    grads = []
    for gc in (False, True):
        model = load_causal_lm(ModelSpec(path=str(tiny_model_dir), gradient_checkpointing=gc))
        assert model.is_gradient_checkpointing == gc
        if gc:
            assert model.config.use_cache is False
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_sequence_classifier_has_one_seeded_label(tiny_model_dir, demo_tokenizer):
    a = load_sequence_classifier(str(tiny_model_dir))
    b = load_sequence_classifier(str(tiny_model_dir))
    c = load_sequence_classifier(ModelSpec(path=str(tiny_model_dir), seed=3))
    assert a.config.num_labels == 1 and a.score.weight.shape == (1, a.config.hidden_size)
    assert a.config.pad_token_id == demo_tokenizer.pad_token_id
    assert torch.equal(a.score.weight, b.score.weight)  # a new head is seeded
    assert not torch.equal(a.score.weight, c.score.weight)
    # the backbone is the saved one
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert torch.equal(a.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    ids, mask = _ids(demo_tokenizer)
    with torch.no_grad():
        assert a(input_ids=ids, attention_mask=mask).logits.shape == (2, 1)


def test_sequence_classifier_lora_keeps_the_head_trainable(tiny_model_dir):
    model = load_sequence_classifier(ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=4)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)


def test_load_tokenizer_sets_pad_and_right_padding(tmp_path):
    from lightning_rlhf.demo.assets import build_tokenizer

    tok = build_tokenizer()
    tok.pad_token = None
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "</s>"
    assert loaded.padding_side == "right"
