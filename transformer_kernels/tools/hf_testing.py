"""Tiny Hugging Face models with random weights (no downloads) and the comparisons of a converted model against the
same model on transformers' eager attention: logits at real positions, every parameter's gradient, greedy
generation with the KV cache, and an AdamW training curve. Used by tests/test_huggingface.py and `make check`."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import convert

FAMILIES = ("bert", "gpt2", "bart", "t5", "llama")
VOCAB = 96


def _config(family: str, layers: int):
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=0)
    if family == "bert":
        return tf.BertForMaskedLM, tf.BertConfig(**common, hidden_size=32, num_hidden_layers=layers,
                                                 num_attention_heads=2,
                                                 intermediate_size=64, max_position_embeddings=64,
                                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(**common, n_embd=32, n_layer=layers, n_head=2, n_positions=64,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                                 eos_token_id=2)
    if family == "bart":
        return tf.BartForConditionalGeneration, tf.BartConfig(
            **common, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=2, forced_eos_token_id=None)
    if family == "t5":
        # Gated GELU feed-forwards (T5 v1.1) and a learned relative position bias in every first layer.
        return tf.T5ForConditionalGeneration, tf.T5Config(
            **common, d_model=32, d_kv=16, d_ff=64, num_layers=layers, num_decoder_layers=layers, num_heads=2,
            relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu", eos_token_id=2,
            decoder_start_token_id=0)
    if family == "llama":
        # Grouped-query attention: 4 query heads share 2 key/value heads.
        return tf.LlamaForCausalLM, tf.LlamaConfig(**common, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                                   num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def tiny_model(family: str, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               layers: int = 2) -> nn.Module:
    """A model of ``family`` with ``layers`` layers (per stack) and random weights, on eager attention, in eval
    mode."""
    cls, config = _config(family, layers)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls(config).to(device=device, dtype=dtype).eval()


def is_seq2seq(family: str) -> bool:
    return family in ("bart", "t5")


def is_generator(family: str) -> bool:
    return family != "bert"


@dataclass
class Batch:
    inputs: dict[str, Tensor]
    real: Tensor  # bool [B, L] of the positions the logits are compared at (not padding)


def batch(family: str, padding_side: str, seed: int = 0, device: torch.device | str = "cpu",
          b: int = 2, length: int = 11) -> Batch:
    """Token ids with their attention mask; the second sequence is 4 tokens shorter, padded on ``padding_side``.
    Sequence-to-sequence models get decoder ids too (the compared positions are the decoder's)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    if padding_side == "right":
        mask[1, length - 4:] = 0
    else:
        mask[1, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    real = mask.bool()
    if is_seq2seq(family):
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (b, 7), generator=g)
        real = torch.ones(b, 7, dtype=torch.bool)
    return Batch({k: v.to(device) for k, v in inputs.items()}, real.to(device))


def converted_pair(family: str, backend: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   layers: int = 2) -> tuple[nn.Module, nn.Module]:
    """(eager model, the same weights converted onto ``backend``)."""
    eager = tiny_model(family, device=device, dtype=dtype, layers=layers)
    ours = convert(copy.deepcopy(eager), backend=backend)
    return eager, ours


def _loss_weights(shape: torch.Size, device) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)


def logits_and_grads(model: nn.Module, b: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits at the real positions, and every parameter's gradient of a random projection of them."""
    model.zero_grad(set_to_none=True)
    logits = model(**b.inputs).logits
    real = logits[b.real]
    (real.float() * _loss_weights(real.shape, real.device)).sum().backward()
    params = getattr(model, "_orig_mod", model).named_parameters()  # a torch.compile wrapper: the model's names
    grads = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}
    return real.detach(), grads


def generate(model: nn.Module, family: str, device: torch.device | str = "cpu", new_tokens: int = 5) -> Tensor:
    """Greedy decoding with the KV cache; decoder-only models get a left-padded batch."""
    b = batch(family, "right" if is_seq2seq(family) else "left", seed=3, device=device, length=8)
    with torch.no_grad():
        return model.generate(**b.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              use_cache=True, num_beams=1)


def train_losses(model: nn.Module, family: str, steps: int = 20, device: torch.device | str = "cpu") -> list[float]:
    """Per-step losses of ``steps`` AdamW steps cycling over two fixed batches, so the loss falls as the model
    memorises them (labels: the ids; -100 at padding)."""
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        b = batch(family, "right", seed=100 + step % 2, device=device)
        labels = b.inputs.get("decoder_input_ids", b.inputs["input_ids"]).masked_fill(~b.real, -100)
        loss = model(**b.inputs, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def max_error(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def max_grad_error(ours: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[str, float]:
    """The parameter whose gradient differs most, and by how much: the max abs error relative to that
    parameter's largest reference entry, floored at 1% of the largest entry of the model (a gradient that is zero
    in exact arithmetic, as a key bias's under softmax, has only rounding noise to compare). A parameter with a
    gradient on one side only counts as infinitely wrong."""
    if set(ours) != set(ref):
        return sorted(set(ours) ^ set(ref))[0], float("inf")
    model_max = max((g.abs().max().item() for g in ref.values()), default=0.0)
    worst = ("", 0.0)
    for name in sorted(ref):
        scale = max(ref[name].abs().max().item(), 0.01 * model_max, 1e-12)
        worst = max(worst, (name, max_error(ours[name], ref[name]) / scale), key=lambda t: t[1])
    return worst


def compare_family(family: str, backend: str, device: torch.device | str = "cpu",
                   pair: tuple[nn.Module, nn.Module] | None = None) -> list[tuple[str, float, float]]:
    """``(name, error, bound)`` rows of a converted model against eager in fp32: logits with right and left
    padding (max abs error, bound 1e-4), every parameter's gradient (max error relative to the largest entry,
    bound 1e-3). ``pair``: the (eager, converted) models to compare, built here when None."""
    eager, ours = pair or converted_pair(family, backend, device)
    rows = []
    for side in ("right", "left"):
        b = batch(family, side, device=device)
        ref_logits, ref_grads = logits_and_grads(eager, b)
        logits, grads = logits_and_grads(ours, b)
        rows.append((f"logits ({side} padding)", max_error(logits, ref_logits), 1e-4))
        name, err = max_grad_error(grads, ref_grads)
        rows.append((f"grad {name} ({side} padding)", err, 1e-3))
    return rows


# ---- distributed training (tests/test_distributed.py) ----------------------------------------------------------


def global_batch(step: int, rows: int = 4, length: int = 9) -> Tensor:
    """Unpadded token ids of one step's global batch (rank r of W trains on rows r·rows/W onwards)."""
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(200 + step % 2))


def distributed_losses(family: str, backend: str, mode: str, steps: int, rank: int = 0, world: int = 1) -> list[float]:
    """Per-step global-batch losses of a converted model trained with AdamW: ``mode`` "single" (this process, the
    whole batch), "ddp" (DistributedDataParallel) or "fsdp2" (fully_shard on every decoder layer and the root),
    on one layer (the kernels run interpreted or simulated on the CPU);
    the distributed modes need an initialised process group and return the all-reduced mean loss."""
    import torch.distributed as dist

    model = convert(tiny_model(family, layers=1), backend=backend)
    model.train()
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        ids = global_batch(step)
        share = ids.shape[0] // world
        ids = ids[rank * share:(rank + 1) * share]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def distributed_worker(rank: int, world: int, store: str, family: str, backend: str, mode: str, steps: int,
                       out: str) -> None:
    """torch.multiprocessing.spawn target: one rank of `distributed_losses` over gloo, rendezvous through the file
    ``store`` (no TCP server whose owner may exit first, no port to race for); rank 0 writes the losses to ``out``
    (JSON)."""
    import json
    import os
    import sys

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        losses = distributed_losses(family, backend, mode, steps, rank, world)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(losses, f)
        # Every rank done with its collectives before any tears the group down (gloo aborts a rank whose peer
        # destroyed the group under an operation still in flight).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's worker threads can still be joinable when C++ static
    # destructors run, and std::thread's destructor then aborts the rank (seen about once in 15 runs), though
    # its work is done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
