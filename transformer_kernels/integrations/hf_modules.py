"""`convert_hf_model`: transformers models onto our kernels, in place.

Each swapped module keeps its object, parameters, buffers, hooks, device, dtype and train/eval mode: only its class
changes, to a subclass whose forward runs the fused ops. So parameter names, their order and state_dict keys are
unchanged (save_pretrained/from_pretrained, optimizers and checkpoints keep working) and an unknown module is left
alone. A module whose call falls outside what the fused forward computes exactly (a weight in another dtype than
its input, as T5 keeps ``wo`` in fp32) runs its original forward for that call.

What is swapped (matched by exact class, so a user subclass with its own forward is never touched):
- ``nn.LayerNorm`` → ``layer_norm``; Llama/Mistral/Qwen2 RMSNorm and T5LayerNorm → ``rms_norm``;
- BERT: ``BertSelfOutput``/``BertOutput`` (dense + dropout in one GEMM epilogue, then the residual add fused into
  the LayerNorm), ``BertIntermediate`` (dense + activation);
- GPT-2: ``GPT2MLP`` (both Conv1D GEMMs, whose weights are stored ``[in, out]``: read transposed, never copied
  into new parameters; activation and dropout in the epilogues);
- BART: the encoder and decoder layers' ``fc1`` with the activation in its epilogue (the layer's own activation
  becomes the identity);
- T5: ``T5DenseActDense`` and ``T5DenseGatedActDense`` (gated GELU through ``gated_linear``);
- BLOOM: ``BloomAttention`` (its query/key/value and output GEMMs, the attention with ALiBi from the slopes instead of
  BLOOM's bias tensor, the output's dropout and residual in the epilogue) and ``BloomMLP`` (GELU and the residual in
  the epilogues); BLOOM does not take an attention implementation, so its own attention class is what is swapped;
- Llama/Mistral/Qwen2 ``*MLP``: swiglu through ``gated_linear``, then ``down_proj``;
- Llama/Mistral/Qwen2/Qwen3/Gemma 1-3 attention: ``apply_rotary_pos_emb`` runs ``rotary`` (q and k in one launch);
- the causal-LM (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, GPT-2, BLOOM), masked-LM (BERT), T5 and BART losses: with labels in
  training the loss is ``linear_cross_entropy`` of the head's input, and the ``[tokens, vocab]`` logits are never
  built.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from . import huggingface

log = logging.getLogger("transformer_kernels")

# transformers' activation modules → the epilogue's activation (the tanh forms are one formula).
_ACTIVATIONS = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "ReLU": "relu",
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "BloomGelu": "gelu_tanh",
}


def activation_name(act: object) -> str | None:
    """The fused activation equal to transformers' activation module ``act`` (None when there is none)."""
    return _ACTIVATIONS.get(type(act).__name__)


def _dropout(self: nn.Module, p: float) -> float:
    return p if self.training else 0.0


def _same_dtype(x: Tensor, *params: Tensor | None) -> bool:
    return all(p is None or p.dtype == x.dtype for p in params)


# ---- fused forwards (``self`` is the swapped module) ----------------------------------------------------------


def _layer_norm(self: nn.LayerNorm, x: Tensor) -> Tensor:
    if len(self.normalized_shape) != 1 or not _same_dtype(x, self.weight, self.bias):
        return self.tk_original_forward(x)
    return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self.tk_backend)


def _rms_norm(self: nn.Module, x: Tensor) -> Tensor:
    if not _same_dtype(x, self.weight):
        return self.tk_original_forward(x)
    return ops.rms_norm(x, self.weight, self.variance_epsilon, backend=self.tk_backend)


def _dense_dropout_residual_norm(self: nn.Module, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
    # BERT's LayerNorm(dropout(dense(h)) + input): dropout in the GEMM epilogue, the residual add in the norm.
    dense, norm = self.dense, self.LayerNorm
    if not _same_dtype(hidden_states, dense.weight, norm.weight) or input_tensor.dtype != hidden_states.dtype:
        return self.tk_original_forward(hidden_states, input_tensor)
    h = ops.linear(hidden_states, dense.weight, dense.bias, dropout_p=_dropout(self, self.dropout.p),
                   backend=self.tk_backend)
    return ops.layer_norm(h, norm.weight, norm.bias, norm.eps, residual=input_tensor, backend=self.tk_backend)


def _dense_activation(self: nn.Module, hidden_states: Tensor) -> Tensor:
    if not _same_dtype(hidden_states, self.dense.weight):
        return self.tk_original_forward(hidden_states)
    return ops.linear(hidden_states, self.dense.weight, self.dense.bias, self.tk_activation, backend=self.tk_backend)


def _gpt2_mlp(self: nn.Module, hidden_states: Tensor) -> Tensor:
    if not _same_dtype(hidden_states, self.c_fc.weight, self.c_proj.weight):
        return self.tk_original_forward(hidden_states)
    # Conv1D computes x @ W + b with W [in, out]: W.T is the [out, in] the GEMM takes, a view.
    h = ops.linear(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self.tk_activation, backend=self.tk_backend)
    return ops.linear(h, self.c_proj.weight.t(), self.c_proj.bias, dropout_p=_dropout(self, self.dropout.p),
                      backend=self.tk_backend)


def _linear_activation(self: nn.Linear, x: Tensor) -> Tensor:
    # BART's fc1 with the layer's activation moved into its epilogue.
    if not _same_dtype(x, self.weight, self.bias):
        return self.tk_activation_module(self.tk_original_forward(x))
    return ops.linear(x, self.weight, self.bias, self.tk_activation, backend=self.tk_backend)


def _t5_output(self: nn.Module, h: Tensor) -> Tensor:
    # As T5 does: the hidden states meet wo in wo's dtype (kept in fp32 for 8-bit checkpoints).
    if h.dtype != self.wo.weight.dtype:
        h = h.to(self.wo.weight.dtype)
    return ops.linear(h, self.wo.weight, self.wo.bias, backend=self.tk_backend)


def _t5_dense(self: nn.Module, hidden_states: Tensor) -> Tensor:
    if not _same_dtype(hidden_states, self.wi.weight):
        return self.tk_original_forward(hidden_states)
    h = ops.linear(hidden_states, self.wi.weight, self.wi.bias, self.tk_activation,
                   dropout_p=_dropout(self, self.dropout.p), backend=self.tk_backend)
    return _t5_output(self, h)


def _t5_gated(self: nn.Module, hidden_states: Tensor) -> Tensor:
    if not _same_dtype(hidden_states, self.wi_0.weight, self.wi_1.weight):
        return self.tk_original_forward(hidden_states)
    h = ops.gated_linear(hidden_states, self.wi_0.weight, self.wi_1.weight, self.wi_0.bias, self.wi_1.bias,
                         self.tk_activation, backend=self.tk_backend)
    return _t5_output(self, self.dropout(h))


def _gated_mlp(self: nn.Module, x: Tensor) -> Tensor:
    g, u, d = self.gate_proj, self.up_proj, self.down_proj
    if not _same_dtype(x, g.weight, u.weight, d.weight):
        return self.tk_original_forward(x)
    h = ops.gated_linear(x, g.weight, u.weight, g.bias, u.bias, self.tk_activation, backend=self.tk_backend)
    return ops.linear(h, d.weight, d.bias, backend=self.tk_backend)


def _bloom_slopes(self: nn.Module, device: torch.device) -> Tensor:
    """BLOOM's ALiBi slopes ``[H]`` fp32, read from the model's own `build_alibi_tensor` (slope · position) at
    position 1, made once per device and kept outside the module's state (no new buffer in its state_dict)."""
    cache = self.__dict__.setdefault("tk_alibi_slopes", {})
    if device not in cache:
        modeling = sys.modules[type(self).tk_original_forward.__module__]
        alibi = modeling.build_alibi_tensor(torch.ones(1, 2, device=device), self.num_heads, torch.float32)
        cache[device] = alibi.view(self.num_heads, 2)[:, 1].contiguous()
    return cache[device]


def _bloom_attention(self: nn.Module, hidden_states: Tensor, residual: Tensor, alibi: Tensor,
                     attention_mask: Tensor | None, layer_past=None, use_cache: bool = False,
                     output_attentions: bool = False, **kwargs):
    # BLOOM adds slope·(key position) (its `alibi` tensor, read as positions along the attention mask) to the
    # scores. Over the keys a causal row sees, that is ALiBi's −slope·(i − j) plus a constant per row, which the
    # softmax cancels: the kernels take the slopes (`alibi_slopes`, bottom-right for a cache) and no bias tensor.
    qkv, dense = self.query_key_value, self.dense
    if (output_attentions or (self.pretraining_tp > 1 and self.slow_but_exact)
            or not _same_dtype(hidden_states, qkv.weight, dense.weight) or residual.dtype != hidden_states.dtype):
        return self.tk_original_forward(hidden_states, residual, alibi, attention_mask, layer_past, use_cache,
                                        output_attentions, **kwargs)
    q, k, v = self._reshape(ops.linear(hidden_states, qkv.weight, qkv.bias, backend=self.tk_backend))
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    lq = q.shape[2]
    # transformers hands BLOOM a causal mask; without one the layer is still causal (a decoder).
    out = ops.attention(q, k, v, attn_mask=attention_mask, dropout_p=_dropout(self, self.attention_dropout.p),
                        is_causal=attention_mask is None and lq > 1, scale=self.inv_norm_factor,
                        causal_alignment="bottom_right", alibi_slopes=_bloom_slopes(self, q.device),
                        backend=self.tk_backend)
    context = out.transpose(1, 2).reshape(q.shape[0], lq, -1)
    return ops.linear(context, dense.weight, dense.bias, residual=residual,
                      dropout_p=_dropout(self, self.hidden_dropout), backend=self.tk_backend), None


def _bloom_mlp(self: nn.Module, hidden_states: Tensor, residual: Tensor) -> Tensor:
    up, down = self.dense_h_to_4h, self.dense_4h_to_h
    if ((self.pretraining_tp > 1 and self.slow_but_exact) or not _same_dtype(hidden_states, up.weight, down.weight)
            or residual.dtype != hidden_states.dtype):
        return self.tk_original_forward(hidden_states, residual)
    h = ops.linear(hidden_states, up.weight, up.bias, self.tk_activation, backend=self.tk_backend)
    return ops.linear(h, down.weight, down.bias, residual=residual, dropout_p=_dropout(self, self.hidden_dropout),
                      backend=self.tk_backend)


# ---- the language-model loss without logits, and rotary through transformers' hook point ----------------------

# Model class → (the module path of its vocabulary projection, whether the labels are shifted (causal LM) as
# transformers' ForCausalLMLoss does). BERT's masked LM, T5 and BART take plain mean cross-entropy over unshifted
# labels.
_LM_LOSSES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("lm_head", True),
    "MistralForCausalLM": ("lm_head", True),
    "Qwen2ForCausalLM": ("lm_head", True),
    "Qwen3ForCausalLM": ("lm_head", True),
    "GemmaForCausalLM": ("lm_head", True),
    "Gemma2ForCausalLM": ("lm_head", True),  # final_logit_softcapping becomes the op's softcap
    "Gemma3ForCausalLM": ("lm_head", True),
    "GPT2LMHeadModel": ("lm_head", True),
    "BloomForCausalLM": ("lm_head", True),
    "BertForMaskedLM": ("cls.predictions.decoder", False),
    "T5ForConditionalGeneration": ("lm_head", False),
    "BartForConditionalGeneration": ("lm_head", False),
}
# A [1, V] buffer such a model adds to the head's output (BART's final_logits_bias): the loss takes it as its bias, and
# while the head's input is captured the model adds an empty one to the empty placeholder logits.
_LOGITS_BIAS = "final_logits_bias"


def _lm_head(self: nn.Linear, x: Tensor) -> Tensor:
    # While the model's fused loss runs, the head hands its input over instead of computing the [..., vocab] logits.
    captured = self.__dict__.get("tk_captured")
    if captured is None:
        return self.tk_original_forward(x)
    captured.append(x)
    return x.new_empty((*x.shape[:-1], 0))


def _lm_with_loss(self: nn.Module, *args, **kwargs):
    """The model's own forward, except that with labels under grad mode (training) the loss comes from
    ``linear_cross_entropy`` on the head's input: no logits are built (``logits`` is None in the output). Without
    labels, or under no_grad (evaluation, generation), the original forward runs and returns the logits."""
    labels = kwargs.get("labels")
    head = self.get_submodule(self.tk_head)
    # The head stays converted unless someone swapped it since (then it would compute the logits it should hand over).
    if labels is None or args or not torch.is_grad_enabled() or "tk_captured" not in head.__dict__:
        return self.tk_original_forward(*args, **kwargs)
    want_tuple = kwargs.get("return_dict") is False
    inner = {**kwargs, "labels": None, "return_dict": True}
    if self.config.is_encoder_decoder:
        inner["use_cache"] = False  # as T5 and BART do whenever labels are given
        if kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
            # The decoder inputs the model would build from the labels: T5's method, BART's module function.
            shift = getattr(self, "_shift_right", None)
            modeling = sys.modules[self.tk_original_forward.__module__]  # the model's own modeling module
            inner["decoder_input_ids"] = shift(labels) if shift is not None else modeling.shift_tokens_right(
                labels, self.config.pad_token_id, self.config.decoder_start_token_id)
    logits_bias = self._buffers.get(_LOGITS_BIAS)
    head.tk_captured = []
    try:
        if logits_bias is not None:
            self._buffers[_LOGITS_BIAS] = logits_bias[:, :0]
        out = self.tk_original_forward(**inner)
        hidden = head.tk_captured[-1]
    finally:
        head.tk_captured = None
        if logits_bias is not None:
            self._buffers[_LOGITS_BIAS] = logits_bias
    ignore_index = kwargs.get("ignore_index", -100)
    num_items = kwargs.get("num_items_in_batch") if self.tk_shift else None
    target = labels
    if self.tk_shift:
        target = kwargs.get("shift_labels")
        if target is None:  # position i predicts token i + 1; the last position predicts nothing
            target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if hidden.dtype != head.weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(head.weight.dtype)  # as the head's Linear would need (under autocast the op casts)
    bias = head.bias
    if logits_bias is not None:
        bias = logits_bias[0].to(hidden.dtype) if bias is None else bias + logits_bias[0].to(bias.dtype)
    loss = ops.linear_cross_entropy(hidden, head.weight, target.to(hidden.device), bias, ignore_index=ignore_index,
                                    reduction="mean" if num_items is None else "sum",
                                    softcap=getattr(self.config, "final_logit_softcapping", None),
                                    backend=self.tk_backend).float()
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    # A new output rather than attributes set on this one: a ModelOutput's dict view (out["loss"], what the Trainer
    # reads, and to_tuple) takes no key that was None at construction, and keeps a key when it is set to None.
    fields = {name: value for name, value in out.items() if name != "logits"}
    out = type(out)(**fields, loss=loss)
    return out.to_tuple() if want_tuple else out


# transformers.models.<name>.modeling_<name> modules whose attention calls the module-level
# ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` (transformers' "rotary_pos_emb" kernel hook point) with
# per-token ``[B, L, D]`` tables and GPT-NeoX pairs.
_ROTARY_ATTENTIONS = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "GemmaAttention",
                      "Gemma2Attention", "Gemma3Attention"}
# The backends of the converted attention modules running now (innermost last). A list, as backends._scoped, so that
# torch.compile reads it; an unconverted model of the same class never pushes, so it keeps transformers' rotary.
_rotary_scopes: list[str | None] = []


def _rotary_attention(self: nn.Module, *args, **kwargs):
    _rotary_scopes.append(self.tk_backend)
    try:
        return self.tk_original_forward(*args, **kwargs)
    finally:
        _rotary_scopes.pop()


def _install_rotary(modeling: object) -> None:
    """Replaces ``modeling.apply_rotary_pos_emb`` (once) by a function that runs ``ops.rotary`` inside a converted
    attention module and transformers' own function everywhere else."""
    original = modeling.apply_rotary_pos_emb
    if getattr(original, "tk_original", None) is not None:
        return

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        # Ours: inside a converted attention, per-token [B, L, R] tables broadcast over dim 1 (the heads), no other
        # argument; anything else is transformers' own call.
        if not _rotary_scopes or args or set(kwargs) - {"unsqueeze_dim"} or kwargs.get("unsqueeze_dim", 1) != 1 or \
                cos.dim() != 3:
            return original(q, k, cos, sin, *args, **kwargs)
        return ops.rotary(q, k, cos, sin, backend=_rotary_scopes[-1])

    apply_rotary_pos_emb.tk_original = original
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


# ---- the swap table --------------------------------------------------------------------------------------------

# class name → (fused forward, the attribute holding its activation module or None). Exact classes of
# transformers.models.* (or torch.nn for LayerNorm); the RMSNorms listed compute exactly Llama's formula.
_SWAPS: dict[str, tuple[Callable, str | None]] = {
    "LayerNorm": (_layer_norm, None),
    "LlamaRMSNorm": (_rms_norm, None),
    "MistralRMSNorm": (_rms_norm, None),
    "Qwen2RMSNorm": (_rms_norm, None),
    "T5LayerNorm": (_rms_norm, None),
    "GptOssRMSNorm": (_rms_norm, None),
    "BertSelfOutput": (_dense_dropout_residual_norm, None),
    "BertOutput": (_dense_dropout_residual_norm, None),
    "BertIntermediate": (_dense_activation, "intermediate_act_fn"),
    "GPT2MLP": (_gpt2_mlp, "act"),
    "BloomAttention": (_bloom_attention, None),
    "BloomMLP": (_bloom_mlp, "gelu_impl"),
    "T5DenseActDense": (_t5_dense, "act"),
    "T5DenseGatedActDense": (_t5_gated, "act"),
    "LlamaMLP": (_gated_mlp, "act_fn"),
    "MistralMLP": (_gated_mlp, "act_fn"),
    "Qwen2MLP": (_gated_mlp, "act_fn"),
}
# Layers whose fc1 takes the activation into its epilogue (the layer applies `activation_fn` to fc1's output).
_FC1_LAYERS = {"BartEncoderLayer", "BartDecoderLayer"}

# (original class, fused forward) → the fused class: nn.Linear has two (BART's fc1, the LM heads).
_fused_classes: dict[tuple[type, Callable], type] = {}


def _fused_class(cls: type, forward: Callable, suffix: str = "") -> type:
    """A subclass of ``cls`` with the fused forward, made once per (class, forward) and importable by name (pickle):
    ``Fused<class><suffix>``."""
    key = (cls, forward)
    if key not in _fused_classes:
        name = f"Fused{cls.__name__}{suffix}"
        # tk_original_forward: the fused forwards' way back to the original one. Not super(type(self), self): FSDP2's
        # fully_shard subclasses the module's class again, and type(self) would then lead back to the fused forward.
        fused = type(name, (cls,), {"forward": forward, "tk_original_forward": cls.forward, "__module__": __name__,
                                    "__qualname__": name})
        setattr(sys.modules[__name__], name, fused)
        _fused_classes[key] = fused
    return _fused_classes[key]


def _is_ours_to_swap(m: nn.Module) -> bool:
    module = type(m).__module__
    return module.startswith("transformers.models.") or type(m) is nn.LayerNorm


def _swap(m: nn.Module, forward: Callable, backend: str | None, activation: str | None = None, suffix: str = "") -> None:
    m.__class__ = _fused_class(type(m), forward, suffix)
    m.tk_backend = backend
    m.tk_activation = activation


def convert_hf_model(model: nn.Module, backend: str | None = None) -> Counter:
    """Sets ``model``'s attention implementation to ``"transformer_kernels"`` (where the model takes one) and swaps in
    every module the table above names. ``backend`` (None: the one in force at each call) is stored on the modules as
    ``tk_backend``. Returns the count of swapped modules per original class (also logged)."""
    # A model whose attention takes no implementation (BLOOM's computes its own) keeps its setting: its attention
    # class is swapped below instead.
    if model._can_set_attn_implementation():
        model.set_attn_implementation(huggingface.NAME)
    swapped: Counter = Counter()
    skipped: Counter = Counter()
    for m in model.modules():
        m.tk_backend = backend  # read by the attention function of the attention modules
        cls = type(m)
        if cls in _fused_classes.values():
            continue  # converted before
        name = cls.__name__
        if name in _FC1_LAYERS and _is_ours_to_swap(m) and type(m.fc1) is nn.Linear:
            act = activation_name(m.activation_fn)
            if act is None:
                skipped[f"{name} (activation {type(m.activation_fn).__name__})"] += 1
                continue
            fc1 = m.fc1
            # Kept for the unfused fallback, outside the module tree (no new submodule in named_modules).
            fc1.__dict__["tk_activation_module"] = m.activation_fn
            _swap(fc1, _linear_activation, backend, act)
            m.activation_fn = nn.Identity()
            swapped[f"{name}.fc1"] += 1
        if name in _LM_LOSSES and _is_ours_to_swap(m):
            path, shift = _LM_LOSSES[name]
            head = m.get_submodule(path)
            if type(head) is nn.Linear:
                _swap(head, _lm_head, backend, suffix="LMHead")
                head.tk_captured = None
                _swap(m, _lm_with_loss, backend)
                m.tk_head, m.tk_shift = path, shift
                swapped[f"{name} loss"] += 1
            continue
        if name in _ROTARY_ATTENTIONS and _is_ours_to_swap(m):
            _install_rotary(sys.modules[type(m).__module__])
            _swap(m, _rotary_attention, backend)
            swapped[f"{name} rotary"] += 1
            continue
        if name not in _SWAPS or not _is_ours_to_swap(m):
            continue
        forward, act_attr = _SWAPS[name]
        act = None
        if act_attr is not None:
            act = activation_name(getattr(m, act_attr))
            if act is None:
                skipped[f"{name} (activation {type(getattr(m, act_attr)).__name__})"] += 1
                continue
        _swap(m, forward, backend, act)
        swapped[name] += 1
    log.info("transformer_kernels.convert: swapped %s", dict(swapped) or "nothing")
    if skipped:
        log.info("transformer_kernels.convert: left alone (no fused equivalent) %s", dict(skipped))
    return swapped


def is_hf_model(model: nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel`` (without importing transformers when it is not loaded)."""
    hf = sys.modules.get("transformers")
    return hf is not None and isinstance(model, hf.PreTrainedModel)


__all__ = ["activation_name", "convert_hf_model", "is_hf_model"]
