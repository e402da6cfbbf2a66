"""A Llama causal LM cut three ways for SFPrompt: head (embeddings + first blocks + soft prompt),
body (middle blocks), tail (last blocks + final norm + the label rows of the LM head).

Every part runs the model's own decoder layers with the model's own causal mask and rotary
embeddings (``create_causal_mask`` / ``rotary_emb``, exactly as ``LlamaModel.forward`` calls them),
so head → body → tail equals the unsplit model on the same input embeddings bit for bit in the
forward pass and to float tolerance in the backward pass (tests/test_sfprompt_split.py).

The soft prompt is inserted where each left-padded row's text begins: ``[pad…, prompt, text…]``.
Putting it before the padding would make the prompt-to-text distance (RoPE) depend on the pad count.

Shared by the data owner (head, tail) and the coordinator (body, and the whole pipeline for
evaluation): both sides load the same base model from the model store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


class SplitLlama:
    """Views on one ``LlamaForCausalLM``; no weights are copied. Only the tail's weights train."""

    def __init__(self, model, head_layers: int, tail_layers: int):
        layers = model.model.layers
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
        self.embed = model.model.embed_tokens
        self.norm = model.model.norm
        self.rotary = model.model.rotary_emb
        self.lm_head = model.lm_head

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

    def run_blocks(self, blocks, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run decoder ``blocks`` on ``hidden`` [B, S, H] with the padding mask [B, S] (1 = real)."""
        from transformers.masking_utils import create_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        causal = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask.long(),
            past_key_values=None, position_ids=position_ids,
        )
        rope = self.rotary(hidden, position_ids=position_ids)
        for block in blocks:
            hidden = block(hidden, attention_mask=causal, position_embeddings=rope, position_ids=position_ids)
        return hidden

    def head(self, input_ids, attention_mask, prompt):
        """(smashed activations [B, S+P, H], padding mask [B, S+P]) — what the data owner sends up."""
        embeds, mask = self.insert_prompt(input_ids, attention_mask, prompt)
        return self.run_blocks(self.head_blocks, embeds, mask), mask

    def body(self, hidden, attention_mask):
        return self.run_blocks(self.body_blocks, hidden, attention_mask)

    def tail_label_logits(self, hidden, attention_mask, label_token_ids: list[int]) -> torch.Tensor:
        """The label words' next-token logits at the last position (left padding: position -1)."""
        hidden = self.run_blocks(self.tail_blocks, hidden, attention_mask)
        last = self.norm(hidden[:, -1])
        # only the label rows of the LM head: equal to lm_head(last)[:, ids], 49152/2 times cheaper
        return F.linear(last, self.lm_head.weight[label_token_ids])

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
        """A soft prompt initialised from the embeddings of ``init_text`` (repeated or cut to length)."""
        ids = tokenizer(init_text, add_special_tokens=False)["input_ids"] if init_text else []
        if not ids:
            raise SplitError("sfprompt.prompt_init_text tokenizes to nothing: set a short instruction sentence")
        ids = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
        with torch.no_grad():
            return self.embed.weight[torch.tensor(ids)].detach().clone()

    # ------------------------------------------------------------------ cost model
    def block_linear_params(self, block) -> int:
        return sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))

    def block_forward_flops(self, block, batch: int, seq: int) -> int:
        """Multiply-adds × 2 of one decoder block: its linear layers plus attention scores and mixing."""
        linear = 2 * batch * seq * self.block_linear_params(block)
        attention = 2 * 2 * batch * seq * seq * self.shape.hidden_size  # QK^T and AV over all heads
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
