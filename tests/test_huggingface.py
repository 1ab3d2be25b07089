"""Hugging Face transformers models on our kernels (integrations/huggingface.py, hf_modules.py) against the same models
on transformers' eager attention: BERT, GPT-2, BART, T5 (gated GELU, learned position bias) and Llama (GQA), tiny
random configs, no downloads."""

import copy
import logging

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import transformers

import transformer_kernels as tk
from transformer_kernels.integrations import hf_modules, huggingface
from transformer_kernels.tools import hf_testing as hft
from transformer_kernels.tools.testing import assert_rows

KERNEL_BACKENDS = ["triton", "cuda"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("family", hft.FAMILIES)
def test_logits_and_every_gradient_match_eager(family, backend, device):
    rows = hft.compare_family(family, backend, device)
    assert len(rows) == 4
    assert_rows(rows, f"{family}, {backend}:")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("family", [f for f in hft.FAMILIES if hft.is_generator(f)])
def test_greedy_generation_with_kv_cache_gives_the_same_tokens(family, backend, device):
    eager, ours = hft.converted_pair(family, backend, device)
    expected = hft.generate(eager, family, device)
    assert expected.shape[1] >= 5
    torch.testing.assert_close(hft.generate(ours, family, device), expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("family", hft.FAMILIES)
def test_adamw_training_curve_matches_eager(family, backend, device):
    # One layer per stack where the kernels run interpreted or simulated (each launch costs there, not its size);
    # the logits and gradient tests above cover two.
    # 10 AdamW steps: the losses diverge from the first step a kernel's gradient is off (the logits and gradient
    # tests above check one step exactly); 20 steps cost 3.5 of make test's minutes on 2 cores for no new failure.
    eager, ours = hft.converted_pair(family, backend, device, layers=2 if device.type == "cuda" else 1)
    expected = hft.train_losses(eager, family, steps=10, device=device)
    losses = hft.train_losses(ours, family, steps=10, device=device)
    assert expected[-1] < expected[0]  # it learns
    # Losses only: the weights are not compared, because a gradient that is zero in exact arithmetic (a key bias's
    # under softmax) is rounding noise on both sides, which Adam's normalisation turns into steps of size lr.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("family", hft.FAMILIES)
def test_bf16_training_curve_on_gpu(family, backend, device):
    eager = hft.tiny_model(family, device=device, dtype=torch.bfloat16)
    ours = tk.convert(copy.deepcopy(eager), backend=backend)
    expected = hft.train_losses(eager, family, steps=20, device=device)
    losses = hft.train_losses(ours, family, steps=20, device=device)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=3e-2, atol=3e-2)


def test_t5_position_bias_trains(device):
    """The relative-attention embeddings get their gradient through the float mask (dMask) on both kernels."""
    eager, _ = hft.converted_pair("t5", "torch", device)
    b = hft.batch("t5", "right", device=device)
    _, ref = hft.logits_and_grads(eager, b)
    names = [f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight" for stack in ("encoder", "decoder")]
    for backend in KERNEL_BACKENDS:
        ours = tk.convert(copy.deepcopy(eager), backend=backend)
        _, grads = hft.logits_and_grads(ours, b)
        for name in names:
            assert ref[name].abs().max() > 0
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{backend} {name}")


@pytest.mark.parametrize("family", hft.FAMILIES)
def test_convert_swaps_modules_and_keeps_parameters(family, tmp_path, caplog):
    model = hft.tiny_model(family)
    model.train()
    before = [(n, p.shape, p.dtype) for n, p in model.named_parameters()]
    keys = list(model.state_dict())
    ids = [id(p) for p in model.parameters()]
    with caplog.at_level(logging.INFO, logger="transformer_kernels"):
        out = tk.convert(model, backend="triton")
    assert out is model
    assert model.config._attn_implementation == huggingface.NAME
    assert [(n, p.shape, p.dtype) for n, p in model.named_parameters()] == before
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == ids
    assert model.training
    expected = {"bert": {"LayerNorm", "BertSelfOutput", "BertOutput", "BertIntermediate", "BertForMaskedLM loss"},
                "gpt2": {"LayerNorm", "GPT2MLP", "GPT2LMHeadModel loss"},
                "bart": {"LayerNorm", "BartEncoderLayer.fc1", "BartDecoderLayer.fc1", "BartForConditionalGeneration loss"},
                "t5": {"T5LayerNorm", "T5DenseGatedActDense", "T5ForConditionalGeneration loss"},
                "llama": {"LlamaRMSNorm", "LlamaMLP", "LlamaForCausalLM loss", "LlamaAttention rotary"}}[family]
    assert set(model.tk_swapped) == expected
    assert "swapped" in caplog.text
    # save_pretrained / from_pretrained round trip: the checkpoint is the unconverted model's
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    for (n, p), q in zip(loaded.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=n)
    # converting twice changes nothing more
    assert not tk.convert(model, backend="triton").tk_swapped


def test_training_loss_builds_no_logits_and_rotary_runs_only_in_converted_models(monkeypatch):
    # With labels under grad mode the converted causal LM returns the loss of linear_cross_entropy and no logits; the
    # loss and every gradient match the eager model's (which builds the logits); under no_grad the logits come back.
    # The rotary hook runs our op inside the converted model only: the eager twin of the same class keeps
    # transformers' function although the module-level name is now ours.
    from transformer_kernels.integrations import hf_modules

    calls = []
    rotary = hf_modules.ops.rotary
    monkeypatch.setattr(hf_modules.ops, "rotary", lambda *a, **k: calls.append(1) or rotary(*a, **k))
    eager, ours = hft.converted_pair("llama", "torch", layers=2)
    b = hft.batch("llama", "right")
    labels = b.inputs["input_ids"].masked_fill(~b.real, -100)
    results = []
    for model in (eager, ours):
        model.zero_grad(set_to_none=True)
        out = model(**b.inputs, labels=labels)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
        assert len(calls) == (0 if model is eager else 2)
    (theirs, their_grads), (mine, my_grads) = results
    assert mine.logits is None and theirs.logits is not None
    torch.testing.assert_close(mine.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    for n, g in their_grads.items():
        torch.testing.assert_close(my_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        assert ours(**b.inputs, labels=labels).logits.shape == (2, 11, hft.VOCAB)
    # The Trainer's gradient accumulation passes num_items_in_batch (a sum divided by it); shift_labels replaces the
    # shift; a tuple when return_dict=False.
    extra = {"num_items_in_batch": torch.tensor(7), "shift_labels": labels.roll(-2, 1)}
    torch.testing.assert_close(ours(**b.inputs, labels=labels, **extra).loss,
                               eager(**b.inputs, labels=labels, **extra).loss, rtol=1e-5, atol=1e-6)
    assert ours(**b.inputs, labels=labels, return_dict=False)[0].shape == ()
    out = ours(**b.inputs, labels=labels)
    assert out["loss"] is out.loss and "logits" not in out  # the dict view the Trainer reads


def test_bart_loss_takes_final_logits_bias_and_builds_decoder_inputs():
    # BART adds final_logits_bias after its head and builds decoder inputs from the labels: the fused loss takes the
    # buffer as its bias (an empty one stands in while the head's input is captured, then the buffer is back).
    eager, ours = hft.converted_pair("bart", "triton", layers=1)
    bias = torch.randn(1, hft.VOCAB, generator=torch.Generator().manual_seed(3))
    for model in (eager, ours):
        model.final_logits_bias.copy_(bias)
    b = hft.batch("bart", "right")
    labels = b.inputs["decoder_input_ids"]
    inputs = {n: t for n, t in b.inputs.items() if n != "decoder_input_ids"}
    results = []
    for model in (eager, ours):
        out = model(**inputs, labels=labels)
        out.loss.backward()
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.equal(ours.final_logits_bias, bias) and "final_logits_bias" in dict(ours.named_buffers())
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[1][1].keys() == results[0][1].keys()
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_gemma2_final_logit_softcap_reaches_the_fused_loss():
    # Gemma 2 caps its logits (final_logit_softcapping) after the head: the fused loss caps them in the kernel.
    # Its attention softcap is off here (our attention refuses one by name).
    cfg = transformers.Gemma2Config(vocab_size=hft.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    final_logit_softcapping=3.0, attn_logit_softcapping=None,
                                    max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    eager = transformers.Gemma2ForCausalLM(cfg)
    ours = tk.convert(copy.deepcopy(eager), backend="triton")
    assert {"Gemma2ForCausalLM loss", "Gemma2Attention rotary"} <= set(ours.tk_swapped)
    ids = torch.randint(3, hft.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (eager, ours):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append((out.loss, model.lm_head.weight.grad, model.model.embed_tokens.weight.grad))
    for mine, theirs in zip(losses[1], losses[0], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpt_oss_sinks_and_sliding_window_match_eager(backend):
    # gpt-oss passes its per-head sinks as `s_aux`; its layers alternate a 4-token sliding window (through the mask)
    # with full attention. The sinks are drawn large so each takes a real share of its rows.
    cfg = transformers.GptOssConfig(vocab_size=hft.VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64,
                                    layer_types=["sliding_attention", "full_attention"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    eager = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for layer in eager.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    ours = tk.convert(copy.deepcopy(eager), backend=backend)
    assert ours.config._attn_implementation == huggingface.NAME and ours.tk_swapped["GptOssRMSNorm"] == 5
    grads = _loss_and_grads_match(eager, ours)
    assert grads["model.layers.0.self_attn.sinks"].abs().max() > 1e-4  # the sinks' gradient is compared


def _loss_and_grads_match(eager: nn.Module, ours: nn.Module) -> dict:
    """One training step's loss and every parameter's gradient of a causal LM, ours against eager; eager's grads."""
    ids = torch.randint(3, hft.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (eager, ours):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[1][1].keys() == results[0][1].keys()
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)
    return results[0][1]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gemma2_attention_softcap_matches_eager(backend):
    # Gemma 2 soft-caps its attention scores (attn_logit_softcapping): in the CUDA kernels (a triton-converted model's
    # attention goes where `auto` sends it: cuda on a GPU, the torch backend here). A small cap (2) so the tanh bends
    # the scores; a sliding window on the first layer (through the mask).
    cfg = transformers.Gemma2Config(vocab_size=hft.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=None,
                                    max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    eager = transformers.Gemma2ForCausalLM(cfg)
    ours = tk.convert(copy.deepcopy(eager), backend=backend)
    assert ours.config._attn_implementation == huggingface.NAME and ours.tk_swapped["Gemma2ForCausalLM loss"] == 1
    _loss_and_grads_match(eager, ours)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bloom_alibi_runs_from_the_slopes_and_matches_eager(backend, monkeypatch):
    # BLOOM computes its own attention (no attention implementation to set) with an ALiBi bias tensor: the swapped
    # BloomAttention hands the kernels the model's slopes instead. Training loss and every gradient (the fused LM
    # loss too), logits at the real positions of a left-padded batch, greedy generation with the cache.
    cfg = transformers.BloomConfig(vocab_size=hft.VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                                   attention_dropout=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    eager = transformers.BloomForCausalLM(cfg)
    ours = tk.convert(copy.deepcopy(eager), backend=backend)
    assert {k: ours.tk_swapped[k] for k in ("BloomAttention", "BloomMLP", "BloomForCausalLM loss")} == {
        "BloomAttention": 2, "BloomMLP": 2, "BloomForCausalLM loss": 1}
    slopes = []
    real_attention = tk.ops.attention
    monkeypatch.setattr(tk.ops, "attention", lambda *a, **kw: slopes.append(kw["alibi_slopes"]) or real_attention(*a, **kw))
    _loss_and_grads_match(eager, ours)
    expected = torch.tensor([2.0 ** (-8 * h / 4) for h in range(1, 5)])  # ALiBi's geometric slopes for 4 heads
    assert len(slopes) == 2 and all(torch.equal(s, expected) for s in slopes)
    eager.eval(), ours.eval()
    ids = torch.randint(3, hft.VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        a, b = (m(input_ids=ids, attention_mask=mask).logits for m in (eager, ours))
    torch.testing.assert_close(b[mask.bool()], a[mask.bool()], rtol=1e-5, atol=1e-5)
    tokens = [m.generate(ids[:1], max_new_tokens=4, do_sample=False) for m in (eager, ours)]
    assert torch.equal(tokens[0], tokens[1])


def test_unknown_and_subclassed_modules_are_left_alone():
    # A user's subclass, even one named like ours, may change forward: never swapped.
    user_norm = type("LayerNorm", (nn.LayerNorm,), {})
    model = hft.tiny_model("bert")
    model.bert.embeddings.LayerNorm = user_norm(32)
    tk.convert(model)
    assert type(model.bert.embeddings.LayerNorm) is user_norm
    assert type(model.bert.embeddings.word_embeddings) is nn.Embedding
    assert model.tk_swapped["LayerNorm"] == 5  # the encoder's four and the MLM head's


def test_weights_in_another_dtype_keep_t5s_casts():
    """T5 keeps `wo` in fp32 under bf16 weights (_keep_in_fp32_modules): the fused forward casts as T5 does, and a
    norm whose input and weight differ in dtype runs its original forward."""
    model = hft.tiny_model("t5").to(torch.bfloat16)
    ff = model.encoder.block[0].layer[1].DenseReluDense
    ff.wo.float()
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    norm = model.encoder.final_layer_norm
    expected, expected_norm = ff(x), norm(x.float())
    assert expected.dtype == torch.float32 and expected_norm.dtype == torch.bfloat16
    tk.convert(model, backend="torch")
    assert type(ff).__name__ == "FusedT5DenseGatedActDense" and type(norm).__name__ == "FusedT5LayerNorm"
    out, out_norm = ff(x), norm(x.float())
    assert out.dtype == torch.float32 and out_norm.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_norm, expected_norm, atol=0, rtol=0)


def test_registration_is_idempotent_and_named():
    huggingface.register()
    huggingface.register()
    assert transformers.AttentionInterface._global_mapping[huggingface.NAME] is huggingface.attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    assert AttentionMaskInterface._global_mapping[huggingface.NAME] is sdpa_mask
    model = hft.tiny_model("llama")
    model.set_attn_implementation(huggingface.NAME)
    assert model.config._attn_implementation == huggingface.NAME


@pytest.mark.parametrize("kwarg,value", [("output_attentions", True)])
def test_unsupported_kwargs_are_refused_by_name(kwarg, value):
    q = torch.randn(1, 2, 3, 16)
    module = nn.Module()
    with pytest.raises(ValueError, match=kwarg):
        huggingface.attention_forward(module, q, q, q, None, **{kwarg: value})


def test_attention_function_contract_gqa_decoding_and_prefill(device):
    """Shapes, native GQA, a decoding step seeing every cached key, and a static-cache prefill (Lk > Lq, no
    mask: the unwritten keys are cropped, causal top-left) against SDPA."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=g).to(device)
    k, v = torch.randn(2, 2, 9, 16, generator=g).to(device), torch.randn(2, 2, 9, 16, generator=g).to(device)
    module = nn.Module()
    module.is_causal = True
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for backend in ("triton", "cuda"):
        module.tk_backend = backend
        out, weights = huggingface.attention_forward(module, q[:, :, :1], k, v, None)
        assert weights is None and out.shape == (2, 1, 4, 16)
        torch.testing.assert_close(out.transpose(1, 2), sdpa(q[:, :, :1], k, v, enable_gqa=True), atol=1e-5, rtol=1e-5)
        out, _ = huggingface.attention_forward(module, q, k, v, None, scaling=0.3)
        ref = sdpa(q, k[:, :, :5], v[:, :, :5], is_causal=True, scale=0.3, enable_gqa=True)
        torch.testing.assert_close(out.transpose(1, 2), ref, atol=1e-5, rtol=1e-5)
        mask = (torch.rand(2, 1, 5, 9, generator=g) > 0.3).to(device)
        mask[..., 0] = True
        out, _ = huggingface.attention_forward(module, q, k, v, mask)
        torch.testing.assert_close(out.transpose(1, 2), sdpa(q, k, v, attn_mask=mask, enable_gqa=True),
                                   atol=1e-5, rtol=1e-5)


def test_float_masks_and_dropout_reach_the_kernels(device):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g).to(device) for _ in range(3))
    module = nn.Module()
    module.is_causal = False
    bias = torch.randn(1, 2, 6, 6, generator=g).to(device)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for backend in KERNEL_BACKENDS:
        module.tk_backend = backend
        out, _ = huggingface.attention_forward(module, q, k, v, bias)
        torch.testing.assert_close(out.transpose(1, 2), sdpa(q, k, v, attn_mask=bias), atol=1e-5, rtol=1e-5)
        torch.manual_seed(5)
        dropped, _ = huggingface.attention_forward(module, q, k, v, None, dropout=0.5)
        torch.manual_seed(5)
        again = tk.ops.attention(q, k, v, dropout_p=0.5, backend=backend)
        torch.testing.assert_close(dropped.transpose(1, 2), again, atol=0, rtol=0)
        assert not torch.allclose(dropped.transpose(1, 2), sdpa(q, k, v))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_chunked_prefill_after_a_cache_matches_eager(backend, device):
    """Lq < Lk with real cached keys: 6 tokens prefilled, then 4 at once, then 1 (Llama, GQA, left padding)."""
    eager, ours = hft.converted_pair("llama", backend, device)
    b = hft.batch("llama", "left", device=device, length=11)
    ids, mask = b.inputs["input_ids"], b.inputs["attention_mask"]
    chunked = {}
    for name, model in (("eager", eager), ("ours", ours)):
        cache = transformers.DynamicCache(config=model.config)
        chunks = []
        with torch.no_grad():
            for lo, hi in ((0, 6), (6, 10), (10, 11)):
                out = model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], past_key_values=cache, use_cache=True)
                chunks.append(out.logits)
        chunked[name] = torch.cat(chunks, dim=1)[b.real]
    torch.testing.assert_close(chunked["ours"], chunked["eager"], atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and the chunks agree with one pass over the whole sequence
        whole = eager(**b.inputs).logits
    torch.testing.assert_close(chunked["eager"], whole[b.real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_packed_sequences_run_varlen_and_match_each_sequence_alone(backend, device, monkeypatch):
    """One batch row holding three sequences, described by cu_seq_lens_q/k as DataCollatorWithFlattening does: the
    logits and gradients equal each sequence's own, computed by eager attention, and varlen attention ran."""
    eager, ours = hft.converted_pair("llama", backend, device, layers=1)
    lens = [5, 9, 3]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, hft.VOCAB, (n,), generator=g).to(device) for n in lens]
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32, device=device)
    packed = dict(input_ids=torch.cat(seqs)[None], position_ids=torch.cat([torch.arange(n) for n in lens])[None].to(device),
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
    calls = []
    varlen = tk.ops.varlen_attention
    monkeypatch.setattr(huggingface.ops, "varlen_attention", lambda *a, **kw: calls.append(1) or varlen(*a, **kw))
    got = ours(**packed).logits[0]
    got.sum().backward()
    expected = torch.cat([eager(input_ids=t[None]).logits[0] for t in seqs])
    expected.sum().backward()
    assert len(calls) == 1  # one layer, through the packed path
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for (name, p), (_, q) in zip(ours.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sliding_window_reaches_the_op_as_a_window_and_matches_eager(backend, device, monkeypatch):
    """Mistral's 4-token sliding window reaches the op as ``window=(3, 0)`` (beside transformers' mask, dense) and
    on packed sequences, where no mask exists: logits and every gradient equal eager's, each sequence on its own."""
    cfg = transformers.MistralConfig(vocab_size=hft.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
                                     max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    eager = transformers.MistralForCausalLM(cfg).to(device)
    ours = tk.convert(copy.deepcopy(eager), backend=backend)
    assert set(ours.tk_swapped) == {"MistralRMSNorm", "MistralMLP", "MistralAttention rotary", "MistralForCausalLM loss"}
    windows = []
    for name in ("attention", "varlen_attention"):
        op = getattr(tk.ops, name)
        monkeypatch.setattr(huggingface.ops, name,
                            lambda *a, op=op, **kw: windows.append(kw.get("window")) or op(*a, **kw))
    ids = torch.randint(3, hft.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, eager(ids).logits, atol=1e-4, rtol=1e-4)
    lens = [9, 6, 3]
    seqs = [ids[0, :9], ids[0, 3:9], ids[0, 9:]]
    cu = torch.tensor([0, 9, 15, 18], dtype=torch.int32, device=device)
    packed = dict(input_ids=torch.cat(seqs)[None], position_ids=torch.cat([torch.arange(n) for n in lens])[None].to(device),
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    got = ours(**packed).logits[0]
    got.sum().backward()
    expected = torch.cat([eager(input_ids=t[None]).logits[0] for t in seqs])
    expected.sum().backward()
    assert windows == [(3, 0), (3, -1)]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for (name, p), (_, q) in zip(ours.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_torch_compile_of_a_converted_model(device):
    """dynamo traces the converted model (custom ops through their fake impls, autograd through AOTAutograd)."""
    torch._dynamo.reset()
    eager, ours = hft.converted_pair("llama", "triton", device)
    b = hft.batch("llama", "right", device=device)
    compiled = torch.compile(ours, backend="aot_eager")
    ref_logits, ref_grads = hft.logits_and_grads(eager, b)
    logits, grads = hft.logits_and_grads(compiled, b)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    name, err = hft.max_grad_error(grads, ref_grads)
    assert err < 1e-3, name


def test_activation_names_cover_transformers_gelu_and_silu():
    from transformers.activations import ACT2FN

    x = torch.linspace(-4, 4, 101)
    F = torch.nn.functional
    fused = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": torch.relu, "silu": F.silu}
    for hf_name in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish"):
        act = ACT2FN[hf_name]
        ours = hf_modules.activation_name(act)
        assert ours is not None, hf_name
        torch.testing.assert_close(fused[ours](x), act(x), atol=1e-6, rtol=1e-5, msg=hf_name)
    assert hf_modules.activation_name(ACT2FN["quick_gelu"]) is None
