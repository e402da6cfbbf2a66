"""`instruct`: instruction / chat tuning with a causal-LM loss on the responses only.

Data (JSON Lines), any of, line by line:
- Alpaca: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional);
- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` ending with an
  assistant turn;
- a classification row ``{"text": ..., "label": ...}``, turned into a question and its answer through
  ``instruct.question`` / ``instruct.answer`` (the answer is the label word), as FlowerTune's finance task.

Prompts are rendered with the tokenizer's chat template when it has one (``instruct.chat_template =
"auto"``), else with its model family's (``chat_templates.py``: Gemma, Llama 3, ChatML, recognised by their
turn markers in the vocabulary), else with the documented default below. Which one was used is written
beside every saved sample generation (``RUN_DIR/samples/round-N.jsonl``, key ``template``). The loss covers the assistant tokens only (every
assistant turn, its end-of-turn marker included); prompt tokens carry label -100, as TRL's
completion-only loss. Long rows keep their end (the response) and drop the start of the prompt.

Evaluation: held-out response ``loss`` and ``perplexity`` (primary, lower is better), then greedy
generation on the first ``instruct.generate_examples`` rows scored by ``exact_match`` and ``contains``
(normalised: lower case, punctuation and spaces trimmed) and ROUGE-L F1 (``rougeL``, Google's
``rouge-score``); the first ``instruct.samples`` generations are kept for the run directory.
"""

from __future__ import annotations

import math
import re
import string
from typing import Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data import DataError, Example
from ..models import model_device, to_device
from .base import Task, group_of, right_pad, scored_token_loss, text_field
from .classify import label_index

ROLES = ("system", "user", "assistant")

# The default template (a tokenizer without a chat template, e.g. Gemma 3's GGUF):
#   "### System:\n{content}\n\n" "### User:\n{content}\n\n" "### Assistant:\n{content}{eos}\n\n"
# with the generation prompt "### Assistant:\n".
DEFAULT_HEADER = "### {role}:\n"


class InstructConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # classification rows as instructions: {text} and {choices} ("negative or positive") in the question
    question: str = "{text}\n\nIs the sentiment of this text {choices}? Answer with one word."
    answer: str = "{label}"
    system: str = ""  # a system message put before every conversation ("" = none)
    # auto = the tokenizer's own when it has one, else the model family's when known, else "default"
    chat_template: Literal["auto", "family", "default"] = "auto"
    max_new_tokens: int = Field(16, ge=1, le=1024)
    generate_examples: int = Field(64, ge=0)  # evaluation rows scored by greedy generation (0 = none)
    samples: int = Field(8, ge=0)  # generations saved in the run directory per evaluation

    @field_validator("question")
    @classmethod
    def _question_has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("must contain the placeholder {text}")
        return v

    @field_validator("answer")
    @classmethod
    def _answer_has_label(cls, v: str) -> str:
        if "{label}" not in v:
            raise ValueError("must contain the placeholder {label}")
        return v


def normalize_answer(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"\s+", " ", text)
    return text.strip(string.punctuation + " ")


class InstructTask(Task):
    name = "instruct"
    primary = "perplexity"
    higher_is_better = False
    needs_labels = False  # only for classification rows (labels.json is read when present)

    def __init__(self, cfg, labels=(), tokenizer=None):
        super().__init__(cfg, labels, tokenizer)
        self.icfg: InstructConfig = cfg.instruct
        self._index = {name: i for i, name in enumerate(self.labels)}
        self.template_used = self._template_name() if tokenizer is not None else ""
        self._scorer = None

    # ------------------------------------------------------------------ reading
    def parse(self, obj, where: str, group_field: str = "") -> Example:
        group = group_of(obj, group_field, where)
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
            out = []
            for k, m in enumerate(msgs):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise DataError(f"{where}: message {k} needs 'role' and 'content'")
                role, content = m["role"], m["content"]
                if role not in ROLES:
                    raise DataError(f"{where}: message {k} has unknown role {str(role)[:40]!r}: use one of {list(ROLES)}")
                if not isinstance(content, str):
                    raise DataError(f"{where}: message {k} 'content' must be a string")
                out.append((role, content))
            if out[-1][0] != "assistant":
                raise DataError(f"{where}: the last message must be the assistant's response (role 'assistant')")
            if not out[-1][1].strip():
                raise DataError(f"{where}: empty response: the last assistant message has no content")
            return Example(messages=tuple(out), group=group)
        if "instruction" in obj or "output" in obj:
            fix = "Alpaca lines need 'instruction' and 'output' ('input' optional)"
            instruction = text_field(obj, "instruction", where, fix=fix)
            if "output" not in obj:
                raise DataError(f"{where}: missing field 'output': {fix}")
            output = obj["output"]
            if not isinstance(output, str) or not output.strip():
                raise DataError(f"{where}: empty response: 'output' must be a non-empty string")
            extra = obj.get("input", "")
            if not isinstance(extra, str):
                raise DataError(f"{where}: 'input' must be a string")
            user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
            return Example(messages=(("user", user), ("assistant", output)), group=group)
        if "text" in obj and "label" in obj:
            if not self.labels:
                raise DataError(f"{where}: a classification row needs labels: add labels.json beside the file or set data.labels")
            text = text_field(obj, "text", where, fix="every line needs 'text' and 'label'")
            label = label_index(obj["label"], self.labels, self._index, where)
            return self.from_classification(text, label, group=group, domain=str(obj.get("domain", ""))[:200])
        raise DataError(
            f"{where}: not an instruction line: use {{\"instruction\", \"input\", \"output\"}}, {{\"messages\": [...]}} "
            "or a classification row {\"text\", \"label\"} (with task = \"instruct\")"
        )

    def from_classification(self, text: str, label: int, *, group: str = "", domain: str = "") -> Example:
        choices = " or ".join(self.labels)
        q = self.icfg.question.replace("{choices}", choices).replace("{text}", self.cut(text))
        a = self.icfg.answer.replace("{label}", self.labels[label])
        return Example(text=text, label=label, messages=(("user", q), ("assistant", a)), group=group, domain=domain)

    # ------------------------------------------------------------------ rendering
    def _template_name(self) -> str:
        """"tokenizer", a family's name (``chat_templates.FAMILY_TEMPLATES``) or "default"."""
        from .chat_templates import family_template

        choice = self.icfg.chat_template
        if choice == "auto" and getattr(self.tokenizer, "chat_template", None):
            return "tokenizer"
        self._family = family_template(self.tokenizer) if choice in ("auto", "family") else None
        return self._family.name if self._family is not None else "default"

    def _with_system(self, messages):
        msgs = list(messages)
        if self.icfg.system and (not msgs or msgs[0][0] != "system"):
            msgs.insert(0, ("system", self.icfg.system))
        return msgs

    def render(self, messages, *, generation_prompt: bool) -> str:
        tok = self._need_tokenizer()
        if self.template_used != "default":
            family = self._family.template if self.template_used != "tokenizer" else None
            return tok.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                           add_generation_prompt=generation_prompt, chat_template=family)
        eos = tok.eos_token or ""
        parts = []
        for role, content in messages:
            end = eos if role == "assistant" else ""
            parts.append(DEFAULT_HEADER.format(role=role.capitalize()) + content + end + "\n\n")
        if generation_prompt:
            parts.append(DEFAULT_HEADER.format(role="Assistant"))
        return "".join(parts)

    def _bos(self) -> list[int]:
        """The beginning-of-sequence token the default template needs when the model expects one (chat
        templates write their own). Asked of the tokenizer's encoding itself: Gemma's converted tokenizer
        reports ``add_bos_token = False`` while its post-processor adds ``<bos>``."""
        tok = self.tokenizer
        if self.template_used != "default" or tok.bos_token_id is None:
            return []
        if getattr(tok, "add_bos_token", False) or tok("x")["input_ids"][:1] == [tok.bos_token_id]:
            return [tok.bos_token_id]
        return []

    def _stop_ids(self) -> list[int]:
        """Token ids that end a generated answer: end of text, and the family's end-of-turn marker."""
        tok = self.tokenizer
        ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        family = getattr(self, "_family", None)
        if self.template_used not in ("default", "tokenizer") and family is not None:
            ids.append(tok.convert_tokens_to_ids(family.end_of_turn))
        return ids or None

    def encode_example(self, ex: Example) -> tuple[list[int], list[int]]:
        """(ids, labels): labels are -100 except on assistant tokens."""
        tok = self._need_tokenizer()
        msgs = self._with_system(ex.messages)
        full = self.render(msgs, generation_prompt=False)
        spans, pos = [], 0
        for i, (role, content) in enumerate(msgs):
            if role != "assistant":
                continue
            prefix = self.render(msgs[:i], generation_prompt=True) if i else ""
            upto = self.render(msgs[: i + 1], generation_prompt=False)
            if full.startswith(prefix) and full.startswith(upto) and len(upto) > len(prefix):
                start, end = len(prefix), len(upto)
            else:  # a template whose renderings are not prefixes of each other: find the content itself
                start = full.find(content, pos)
                if start < 0:
                    raise DataError("the chat template drops an assistant message: set instruct.chat_template = \"default\"")
                end = start + len(content)
            # the turn's trailing whitespace after the end-of-turn marker is not a response
            while end > start and full[end - 1] in "\n ":
                end -= 1
            spans.append((start, end))
            pos = end
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [-100] * len(ids)
        for j, (s, e) in enumerate(offsets):
            if any(a <= s < b for a, b in spans):
                labels[j] = ids[j]
        ids, labels = self._bos() + ids, [-100] * len(self._bos()) + labels
        if len(ids) > self.max_length:  # keep the end: the response the loss is on
            ids, labels = ids[-self.max_length :], labels[-self.max_length :]
        return ids, labels

    def prompt_ids(self, ex: Example) -> list[int]:
        """The conversation up to its last assistant turn, ending with the generation prompt."""
        tok = self._need_tokenizer()
        msgs = self._with_system(ex.messages)[:-1]
        ids = self._bos() + tok(self.render(msgs, generation_prompt=True), add_special_tokens=False)["input_ids"]
        return ids[-self.max_length :]

    # ------------------------------------------------------------------ training
    def collate(self, examples):
        rows = [self.encode_example(e) for e in examples]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return right_pad([r[0] for r in rows], pad, labels=[r[1] for r in rows])

    def per_example_loss(self, model, batch) -> torch.Tensor:
        total, count = scored_token_loss(model, batch)
        return total / count.clamp(min=1)

    # ------------------------------------------------------------------ evaluation
    def eval_size(self, n_rows: int, generate: bool = True) -> int:
        return n_rows + (min(n_rows, self.icfg.generate_examples) if generate else 0)

    @torch.no_grad()
    def evaluate(self, model, examples, *, batch_size: int = 32, progress=None, generate: bool = True,
                 samples_out: list | None = None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss_sum, tokens = 0.0, 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            total, count = scored_token_loss(model, to_device(self.collate(chunk), model_device(model)))
            loss_sum += total.sum().item()
            tokens += int(count.sum())
            if progress is not None:
                progress(len(chunk))
        loss = loss_sum / max(tokens, 1)
        out = {"perplexity": math.exp(min(loss, 50.0)), "loss": loss, "examples": float(len(examples)),
               "response_tokens": float(tokens)}
        if generate and self.icfg.generate_examples:
            out.update(self.generation_metrics(model, examples[: self.icfg.generate_examples], batch_size=batch_size,
                                               progress=progress, samples_out=samples_out))
        if was_training:
            model.train()
        return out

    def generate(self, model, examples: Sequence[Example], *, batch_size: int = 16, progress=None) -> list[str]:
        """Greedy continuations of each example's prompt (its last response left out)."""
        tok = self._need_tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        texts = []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            rows = [self.prompt_ids(e) for e in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):  # left padding: every prompt ends at the last position
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
            dev = model_device(model)
            gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=self.icfg.max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=self._stop_ids())
            for row in gen[:, width:]:
                text = tok.decode(row, skip_special_tokens=True)
                if self.template_used == "default":
                    text = text.split("\n### ")[0]
                texts.append(text.strip())
            if progress is not None:
                progress(len(chunk))
        return texts

    def generation_metrics(self, model, examples, *, batch_size: int, progress=None, samples_out=None) -> dict[str, float]:
        from rouge_score import rouge_scorer

        if self._scorer is None:
            self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        outputs = self.generate(model, examples, batch_size=batch_size, progress=progress)
        exact = contains = rouge = 0.0
        for i, (ex, got) in enumerate(zip(examples, outputs)):
            ref = ex.messages[-1][1]
            g, r = normalize_answer(got), normalize_answer(ref)
            exact += float(g == r)
            contains += float(bool(r) and r in g)
            rouge += self._scorer.score(ref, got)["rougeL"].fmeasure
            if samples_out is not None and i < self.icfg.samples:
                samples_out.append({"prompt": ex.messages[-2][1] if len(ex.messages) > 1 else "", "reference": ref,
                                    "generated": got, "template": self.template_used})
        n = max(len(outputs), 1)
        return {"exact_match": exact / n, "contains": contains / n, "rougeL": rouge / n, "generated": float(len(outputs))}
