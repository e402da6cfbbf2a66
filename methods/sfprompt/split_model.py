"""A causal LM cut three ways for SFPrompt: head (embeddings + first blocks + soft prompt), body
(middle blocks), tail (last blocks + final norm + the label rows of the LM head).

Any family of ``fedadapt/architectures.py`` whose positions are rotary (Llama, Mistral, Qwen2/3,
Gemma 2/3, GPT-NeoX) splits: layers, embeddings, final norm, LM head and rotary module are found
through its table. Every part runs the model's own decoder layers with the model's own masks and
rotary embeddings, called as the model's own ``forward`` calls them: one mask per attention kind
(``create_causal_mask``, ``create_sliding_window_causal_mask`` for Gemma's local layers), and
per-kind rotary tables where the family has them (Gemma 3: local and global RoPE bases), each layer
getting its own kind's. So head → body → tail equals the unsplit model on the same input embeddings
bit for bit in the forward pass and to float tolerance in the backward pass
(tests/test_sfprompt_split.py, tests/test_families.py). Gemma's sqrt(hidden) embedding scale lives
in its embedding module: tokens and the initial soft prompt both go through it, so the prompt lives
in the same (scaled) space as the text; Gemma 2's final logit soft-capping is applied to the label logits.

The soft prompt is inserted where each left-padded row's text begins: ``[pad…, prompt, text…]``.
Putting it before the padding would make the prompt-to-text distance (RoPE) depend on the pad count.

Shared by the data owner (head, tail) and the coordinator (body, and the whole pipeline for
evaluation): both sides load the same base model from the model store.
"""

from __future__ import annotations

from dataclasses import dataclass

import inspect

import torch
import torch.nn.functional as F

from fedadapt.architectures import (
    ArchitectureError, attention_types, decoder_layers, embeddings, family_of, final_norm, lm_head, model_type,
    rotary_embedding,
)

TAIL_PREFIX = "tail."
PROMPT_KEY = "prompt"


class SplitError(ValueError):
    """A split that cannot be made with this model (one line: which key, and the fix)."""


@dataclass
class SplitShape:
    num_layers: int
    head_layers: int
    tail_layers: int
    hidden_size: int

    @property
    def body_layers(self) -> int:
        return self.num_layers - self.head_layers - self.tail_layers


def _mask_functions() -> dict:
    from transformers import masking_utils as mu

    return {"full_attention": mu.create_causal_mask, "sliding_attention": mu.create_sliding_window_causal_mask,
            "chunked_attention": mu.create_chunked_causal_mask}


class SplitModel:
    """Views on one causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Gemma3ForCausalLM``, ...); no
    weights are copied. Only the tail's weights train."""

    def __init__(self, model, head_layers: int, tail_layers: int):
        try:
            family = family_of(model)
            layers = decoder_layers(model)
        except ArchitectureError as e:
            raise SplitError(str(e)) from None
        kind = model_type(model)
        if not family.rotary:
            raise SplitError(
                f"sfprompt splits models with rotary positions; {kind!r} adds learned position embeddings with the "
                "token embeddings: choose a Llama, Qwen2, Gemma or GPT-NeoX model"
            )
        if getattr(model.config, "use_bidirectional_attention", False):
            raise SplitError(f"{kind!r} is configured for bidirectional attention: sfprompt needs a causal LM")
        n = len(layers)
        if head_layers < 1 or tail_layers < 1 or head_layers + tail_layers >= n:
            raise SplitError(
                f"sfprompt.head_layers={head_layers} + sfprompt.tail_layers={tail_layers} must leave the body at least "
                f"one of the model's {n} layers: lower them"
            )
        self.model = model
        self.config = model.config
        self.shape = SplitShape(n, head_layers, tail_layers, model.config.hidden_size)
        self.head_blocks = list(layers[:head_layers])
        self.body_blocks = list(layers[head_layers : n - tail_layers])
        self.tail_blocks = list(layers[n - tail_layers :])
        types = attention_types(model.config)
        mask_fns = _mask_functions()
        unknown = sorted(set(types) - set(mask_fns))
        if len(types) != n or unknown:
            raise SplitError(f"{kind!r} lists attention kinds {unknown or types} that sfprompt cannot mask: choose another model")
        # each block's attention kind (Gemma 3: sliding/local or full/global), as the model's own forward reads it
        self.head_types = types[:head_layers]
        self.body_types = types[head_layers : n - tail_layers]
        self.tail_types = types[n - tail_layers :]
        self.embed = embeddings(model)
        if family.scaled_embeddings and not hasattr(self.embed, "embed_scale"):
            raise SplitError(f"this transformers version does not scale {kind!r} embeddings in the embedding module: upgrade it")
        self.norm = final_norm(model)
        self.rotary = rotary_embedding(model)
        self.lm_head = lm_head(model)
        # Gemma 3 keeps one rotary module with a table per attention kind (forward(x, position_ids, layer_type))
        self._rotary_per_kind = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    # ------------------------------------------------------------------ pieces of the forward pass
    def insert_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt: torch.Tensor):
        """Embed ``input_ids`` and put ``prompt`` [P, H] right before each row's first real token."""
        embeds = self.embed(input_ids)
        rows, masks = [], []
        ones = torch.ones(prompt.shape[0], dtype=attention_mask.dtype)
        for i in range(input_ids.shape[0]):
            pads = int((attention_mask[i] == 0).sum())  # left padding: the pads are the first `pads` positions
            rows.append(torch.cat([embeds[i, :pads], prompt.to(embeds.dtype), embeds[i, pads:]]))
            masks.append(torch.cat([attention_mask[i, :pads], ones, attention_mask[i, pads:]]))
        return torch.stack(rows), torch.stack(masks)

    def run_blocks(self, blocks, hidden: torch.Tensor, attention_mask: torch.Tensor, types: list[str] | None = None) -> torch.Tensor:
        """Run decoder ``blocks`` on ``hidden`` [B, S, H] with the padding mask [B, S] (1 = real); ``types``:
        each block's attention kind (default: all full attention)."""
        types = list(types) if types is not None else ["full_attention"] * len(blocks)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask_fns = _mask_functions()
        masks = {
            t: mask_fns[t](config=self.config, inputs_embeds=hidden, attention_mask=attention_mask.long(),
                           past_key_values=None, position_ids=position_ids)
            for t in set(types)
        }
        if self._rotary_per_kind:
            rope = {t: self.rotary(hidden, position_ids, t) for t in set(types)}
        else:
            shared = self.rotary(hidden, position_ids=position_ids)
            rope = {t: shared for t in set(types)}
        for block, t in zip(blocks, types, strict=True):
            out = block(hidden, attention_mask=masks[t], position_embeddings=rope[t], position_ids=position_ids)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def head(self, input_ids, attention_mask, prompt):
        """(smashed activations [B, S+P, H], padding mask [B, S+P]) — what the data owner sends up."""
        embeds, mask = self.insert_prompt(input_ids, attention_mask, prompt)
        return self.run_blocks(self.head_blocks, embeds, mask, self.head_types), mask

    def body(self, hidden, attention_mask):
        return self.run_blocks(self.body_blocks, hidden, attention_mask, self.body_types)

    def tail_label_logits(self, hidden, attention_mask, label_token_ids: list[int]) -> torch.Tensor:
        """The label words' next-token logits at the last position (left padding: position -1)."""
        hidden = self.run_blocks(self.tail_blocks, hidden, attention_mask, self.tail_types)
        last = self.norm(hidden[:, -1])
        # only the label rows of the LM head: equal to lm_head(last)[:, ids], 49152/2 times cheaper
        bias = self.lm_head.bias[label_token_ids] if getattr(self.lm_head, "bias", None) is not None else None
        logits = F.linear(last, self.lm_head.weight[label_token_ids], bias)
        if self.softcap:  # Gemma 2: the model's own final soft-capping, applied per logit
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def label_logits(self, input_ids, attention_mask, prompt, label_token_ids, *, skip_body: bool = False):
        """The whole pipeline in one process (coordinator evaluation), or head → tail (the local model)."""
        hidden, mask = self.head(input_ids, attention_mask, prompt)
        if not skip_body:
            hidden = self.body(hidden, mask)
        return self.tail_label_logits(hidden, mask, label_token_ids)

    # ------------------------------------------------------------------ trainable state
    def tail_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The tail's weights under stable names: ``tail.blocks.<j>.<param>``, ``tail.norm.weight``."""
        out = {}
        for j, block in enumerate(self.tail_blocks):
            for name, p in block.named_parameters():
                out[f"{TAIL_PREFIX}blocks.{j}.{name}"] = p
        for name, p in self.norm.named_parameters():
            out[f"{TAIL_PREFIX}norm.{name}"] = p
        return out

    def freeze_all_but_tail(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.tail_parameters().values():
            p.requires_grad_(True)

    def freeze_all(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)

    def tail_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.tail_parameters().items()}

    def load_tail_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.tail_parameters()
        missing = sorted(set(params) - {k for k in state if k.startswith(TAIL_PREFIX)})
        if missing:
            raise SplitError(f"global state lacks tail tensors {missing[:3]}: the coordinator uses another split")
        with torch.no_grad():
            for k, p in params.items():
                if tuple(state[k].shape) != tuple(p.shape):
                    raise SplitError(f"tail tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
                p.copy_(state[k])

    def initial_prompt(self, tokenizer, prompt_tokens: int, init_text: str) -> torch.Tensor:
        """A soft prompt initialised from the embeddings of ``init_text`` (repeated or cut to length), as the
        embedding module outputs them (Gemma: scaled by sqrt(hidden), like every token it sits beside)."""
        ids = tokenizer(init_text, add_special_tokens=False)["input_ids"] if init_text else []
        if not ids:
            raise SplitError("sfprompt.prompt_init_text tokenizes to nothing: set a short instruction sentence")
        ids = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
        with torch.no_grad():
            return self.embed(torch.tensor(ids)).detach().clone()

    # ------------------------------------------------------------------ cost model
    def block_linear_params(self, block) -> int:
        return sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))

    def block_forward_flops(self, block, batch: int, seq: int) -> int:
        """Multiply-adds × 2 of one decoder block: its linear layers plus attention scores and mixing."""
        linear = 2 * batch * seq * self.block_linear_params(block)
        heads = getattr(self.config, "num_attention_heads", 0)
        head_dim = getattr(self.config, "head_dim", None) or self.shape.hidden_size // max(heads, 1)
        width = heads * head_dim or self.shape.hidden_size
        attention = 2 * 2 * batch * seq * seq * width  # QK^T and AV over all heads
        return linear + attention

    def flops(self, batch: int, seq: int, n_labels: int) -> dict[str, int]:
        """Forward FLOPs of each part for one batch of ``seq`` positions (prompt included)."""
        head = sum(self.block_forward_flops(b, batch, seq) for b in self.head_blocks)
        body = sum(self.block_forward_flops(b, batch, seq) for b in self.body_blocks)
        tail = sum(self.block_forward_flops(b, batch, seq) for b in self.tail_blocks)
        tail += 2 * batch * self.shape.hidden_size * n_labels  # label rows of the LM head, last position
        return {"head": head, "body": body, "tail": tail}


def client_step_flops(parts: dict[str, int]) -> int:
    """One training step on the data owner: head forward + backward to the prompt (activation
    gradients only, ≈ 1× forward: its weights are frozen) and tail forward + backward (≈ 2× forward:
    activation and weight gradients)."""
    return 2 * parts["head"] + 3 * parts["tail"]


def full_finetune_step_flops(parts: dict[str, int]) -> int:
    """The same step fine-tuning the whole model on one device: forward + backward (≈ 3× forward)."""
    return 3 * (parts["head"] + parts["body"] + parts["tail"])


SplitLlama = SplitModel  # the name before the split became architecture-generic
