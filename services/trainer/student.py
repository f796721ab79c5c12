"""The student engine: one causal LM with a LoRA adapter that generates, scores and learns.

It knows nothing of HTTP or of queues; exactly one thread (the batcher's worker) calls it at a time.
Backends: Unsloth FastLanguageModel (4-bit + LoRA) on CUDA when installed; otherwise transformers + peft, with
bitsandbytes 4-bit on CUDA and float32 on CPU. "base" = the same model with the adapter disabled (no copy).
Generation decodes through plain copies of the model with the adapter merged in, where it can (decode_weights.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .decode_weights import MergedDecoder, merge_blocker
from .grpo import grpo_loss, linear_selective_log_softmax, selective_log_softmax
from .model_source import ModelSourceError, resolve_model
from .sampling import sample_next
from .settings import TrainerSettings

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no log-probs; k >= 0: the sampled token's plus the top k alternatives


@dataclass
class Sample:
    token_ids: list[int]  # the generated ids behind `text` (an end-of-sequence token is not included)
    text: str
    finish_reason: str  # "stop" | "length"
    num_generated: int  # tokens produced, including a final end-of-sequence token
    token_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # As vLLM reports it: the stop string that ended the sample; None for end of sequence or the length cap.
    stop_reason: str | None = None


@dataclass
class ScoreItem:
    context_ids: list[int]  # conditioning only
    completion_ids: list[int]  # scored


@dataclass
class GrpoItem:
    context_ids: list[int]
    completion_ids: list[int]
    advantage: float
    old_logprobs: list[float] | None = None
    weight: float = 1.0


@dataclass
class LossConfig:
    type: str = "grpo"
    beta: float = 0.04
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8
    learning_rate: float | None = None
    max_length: int | None = None  # dr_grpo's constant; None = the longest completion of the step


@dataclass
class StepResult:
    loss: float
    kl: float
    clip_fraction: float
    grad_norm: float
    tokens: int
    adapter_version: int
    step: int


class Student:
    def __init__(
        self, model, tokenizer, *, backend: str, device: torch.device, name: str, settings: TrainerSettings
    ):
        self.model = model  # a peft model
        self.tokenizer = tokenizer
        self.backend = backend
        self.device = device
        self.name = name
        self.max_context = settings.max_context
        self.max_batch_rows = settings.max_batch_size
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.step = 0
        self.adapter_version = 0
        self.forward_passes = 0  # model forward calls, reported by /health
        self.last_step_key: str | None = None
        self.last_step_result: StepResult | None = None
        self.sampling_generator = torch.Generator(device=device).manual_seed(settings.seed)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.base_learning_rate = settings.learning_rate
        self.optimizer = _make_optimizer(self.trainable, settings, device)
        causal_lm = model.get_base_model()
        self.decoder = causal_lm.model  # the transformer stack: hidden states without the lm_head
        self.lm_head = causal_lm.get_output_embeddings()
        # The output projection fused into the log-softmax needs a frozen, bias-free lm_head (Llama, Qwen, SmolLM2).
        self.fused_head = (
            getattr(self.lm_head, "bias", None) is None and not self.lm_head.weight.requires_grad
        )
        # bf16 autocast on CUDA: the float32 LoRA weights join the bf16 matmuls instead of upcasting activations.
        self.autocast = device.type == "cuda"
        self.compiled = bool(getattr(model, "compiled_layers", False))
        # transformers 5.x renamed the KV-cache argument from past_key_values to cache.
        self.cache_arg = (
            "cache" if "cache" in inspect.signature(causal_lm.forward).parameters else "past_key_values"
        )
        model.eval()
        # Generation decodes through plain copies with the adapter merged in (decode_weights.py: peft's wrappers
        # cost ~35% of a decode step); None = through the peft model, where merging is not possible.
        blocker = merge_blocker(model, backend)
        self.merged_decoder = MergedDecoder(model) if blocker is None else None
        if blocker is not None:
            log.info("generation runs through the peft model: the adapter cannot be merged with %s", blocker)

    # ----- adapters -----
    def adapter(self, enabled: bool):
        """Context in which the model runs with its LoRA adapter on ("student") or off ("base")."""
        return contextlib.nullcontext() if enabled else self.model.disable_adapter()

    # ----- generation -----
    @torch.inference_mode()
    def generate(
        self,
        requests: list[GenerationRequest],
        *,
        use_adapter: bool = True,
        admit: Callable[[int], list[GenerationRequest]] | None = None,
        on_done: Callable[[int, list[Sample]], None] | None = None,
    ) -> list[list[Sample]]:
        """Generate for many requests in one batched decode loop; returns each request's n samples.

        Prompts are left-padded and prefilled once each; the KV cache is then expanded so a request's n samples
        share its prefill. Finished rows leave the batch (their cache rows are dropped). Continuous batching:
        between decode steps `admit(free_rows)` may hand over new requests, which are prefilled and joined to the
        running batch (their indices follow the earlier ones); `on_done(index, samples)` reports each request as
        soon as all its samples are finished.
        """
        # Decoding runs the layers eagerly: compiled layers would recompile for every KV-cache length.
        stance = torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext()
        if self.merged_decoder is not None:
            model = self.merged_decoder.model(use_adapter, self.adapter_version)
            context = contextlib.nullcontext()
        else:
            model, context = self.model, self.adapter(use_adapter)
        with stance, context:
            return self._generate(model, list(requests), admit, on_done)

    def _prefill(self, model, requests: list[GenerationRequest]):
        """Prefill prompts once each; return (cache, mask, last logits) expanded to one row per sample."""
        from transformers import DynamicCache

        input_ids, mask = self._left_pad([r.prompt_ids for r in requests])
        cache = DynamicCache(config=self.model.config)
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=_positions(mask),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_arg: cache},
        )
        self.forward_passes += 1
        expand = torch.tensor([i for i, r in enumerate(requests) for _ in range(r.n)], device=self.device)
        cache.batch_select_indices(expand)
        return cache, mask[expand], out.logits[:, -1, :][expand]

    def _generate(self, model, requests, admit, on_done) -> list[list[Sample]]:
        owner: list[int] = []  # row -> request index
        sample_index: list[int] = []
        generators: list[torch.Generator | None] = []
        remaining: list[int] = []  # per request: samples not finished yet
        generated: list[list[int]] = []
        logprobs: list[list[float]] = []
        tops: list[list[list[tuple[int, float]]]] = []
        finish: list[str | None] = []
        stop_cut: list[int | None] = []
        results: list[list[Sample] | None] = []

        def add_rows(new_requests: list[GenerationRequest]) -> list[int]:
            first_row = len(owner)
            for request in new_requests:
                index = len(remaining)
                remaining.append(request.n)
                results.append(None)
                for j in range(request.n):
                    owner.append(index)
                    sample_index.append(j)
                    generators.append(self._row_generator(request, j))
                    generated.append([]), logprobs.append([]), tops.append([])
                    finish.append(None), stop_cut.append(None)
            return list(range(first_row, len(owner)))

        cache, mask, logits = self._prefill(model, requests)
        rows = add_rows(requests)  # live rows, in cache order
        while rows:
            if admit is not None and (joining := admit(self._free_rows(len(rows)))):
                requests.extend(joining)
                new_cache, new_mask, new_logits = self._prefill(model, joining)
                mask = _join_cache(cache, mask, new_cache, new_mask)
                logits = torch.cat([logits, new_logits])
                rows = rows + add_rows(joining)
            reqs = [requests[owner[r]] for r in rows]
            next_ids = sample_next(
                logits,
                [q.temperature for q in reqs],
                [q.top_p for q in reqs],
                [generators[r] for r in rows],
                self.sampling_generator,
            )
            want_logprobs = [q.logprobs is not None for q in reqs]
            if any(want_logprobs):
                log_dist = torch.log_softmax(logits.float(), dim=-1)
                picked = log_dist.gather(-1, next_ids.unsqueeze(1)).squeeze(1).tolist()
                k_max = max(q.logprobs or 0 for q in reqs)
                top_v, top_i = log_dist.topk(k_max, dim=-1) if k_max else (None, None)
            next_list = next_ids.tolist()
            keep = []
            for k, r in enumerate(rows):
                token, req = next_list[k], reqs[k]
                generated[r].append(token)
                if want_logprobs[k]:
                    logprobs[r].append(picked[k])
                    if req.logprobs:
                        tops[r].append(
                            list(zip(top_i[k, : req.logprobs].tolist(), top_v[k, : req.logprobs].tolist()))
                        )
                if token in self.eos_ids:
                    finish[r] = "stop"
                elif req.stop and (cut := self._stop_position(generated[r], req.stop)) is not None:
                    finish[r], stop_cut[r] = "stop", cut
                elif len(generated[r]) >= req.max_tokens:
                    finish[r] = "length"
                else:
                    keep.append(k)
                    continue
                remaining[owner[r]] -= 1
                if remaining[owner[r]] == 0:  # the request's last sample: report it now
                    index = owner[r]
                    results[index] = [
                        self._finish_sample(
                            requests[index],
                            generated[row],
                            logprobs[row],
                            tops[row],
                            finish[row] or "length",
                            stop_cut[row],
                        )
                        for row in range(len(owner))
                        if owner[row] == index
                    ]
                    if on_done is not None:
                        on_done(index, results[index])
            if not keep:
                break
            if len(keep) < len(rows):
                index_tensor = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index_tensor)
                mask = mask[index_tensor]
                next_ids = next_ids[index_tensor]
                rows = [rows[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            out = model(
                input_ids=next_ids.unsqueeze(1).to(self.device),
                attention_mask=mask,
                position_ids=(mask.sum(1, keepdim=True) - 1),
                use_cache=True,
                **{self.cache_arg: cache},
            )
            self.forward_passes += 1
            logits = out.logits[:, -1, :]
        return results

    def _free_rows(self, live_rows: int) -> int:
        return max(self.max_batch_rows - live_rows, 0)

    def _row_generator(self, request: GenerationRequest, sample_index: int) -> torch.Generator | None:
        if request.seed is None:
            return None
        seed = (request.seed * 1_000_003 + sample_index) % (2**63)
        return torch.Generator(device=self.device).manual_seed(seed)

    def _stop_position(self, ids: list[int], stops: list[str]) -> int | None:
        """Where the first stop string starts in the decoded text, or None. Called after every token: the
        earlier calls found no stop, so a new one overlaps the last token, and a short tail tells whether
        there is one (a token carries at least one byte of text). The whole text is decoded only on a hit;
        decoding it every step cost O(length^2), about as much as the decode itself on a GPU."""
        window = 4 * max(len(stop.encode()) for stop in stops) + 4
        if len(ids) > window:
            tail = self.tokenizer.decode(ids[-window:], skip_special_tokens=True)
            if not any(stop in tail for stop in stops):
                return None
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        return min(hits) if hits else None

    def _finish_sample(self, request, ids, logprobs, tops, finish_reason, stop_cut) -> Sample:
        num_generated = len(ids)
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        stop_reason = None
        if stop_cut is not None:
            stop_reason = next((stop for stop in request.stop if text.startswith(stop, stop_cut)), None)
            text = text[:stop_cut]
            # The last token completed the stop string; keep it only if text it carries precedes the stop.
            if ids and self.tokenizer.decode(ids[:-1], skip_special_tokens=True) == text:
                ids = ids[:-1]
        sample = Sample(
            token_ids=ids,
            text=text,
            finish_reason=finish_reason,
            num_generated=num_generated,
            stop_reason=stop_reason,
        )
        if request.logprobs is not None:
            sample.token_logprobs = logprobs[: len(ids)]
            sample.top_logprobs = tops[: len(ids)] if request.logprobs else None
        return sample

    # ----- scoring -----
    @torch.inference_mode()
    def logprobs(
        self, items: list[ScoreItem], *, use_adapter: bool = True, batch_size: int = 16
    ) -> list[list[float]]:
        """Per-token log-probs of each item's completion given its context, in padded batches."""
        results: list[list[float]] = []
        with self.adapter(use_adapter):
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                logp, _ = self._completion_logprobs(chunk)
                for row, item in enumerate(chunk):
                    n = len(item.completion_ids)
                    results.append(logp[row, logp.shape[1] - n :].tolist() if n else [])
        return results

    def _completion_logprobs(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) log-probs of the completion tokens, right-aligned (left-padded), and their mask.

        The sequences run through the model right-padded: a left pad is a query that may attend to nothing,
        and on CUDA in bf16 such a fully masked row comes out NaN, which the backward pass of attention
        then spreads into the real keys' gradients (a GRPO step of mixed lengths failed with a non-finite
        gradient). Only the hidden states that predict completion tokens are gathered into the (B, T) layout
        and go through the lm_head, T being the longest completion, not the whole sequence.
        """
        sequences = [list(it.context_ids) + list(it.completion_ids) for it in items]
        input_ids, mask = self._right_pad(sequences)
        width = max(len(it.completion_ids) for it in items)
        lengths = torch.tensor([len(it.completion_ids) for it in items], device=self.device)
        starts = torch.tensor([len(it.context_ids) for it in items], device=self.device)
        column = torch.arange(width, device=self.device)
        completion_mask = (column >= (width - lengths).unsqueeze(1)).float()
        # Column t of row b predicts completion token t - (width - n_b), found at sequence position
        # start_b + that offset; its hidden state sits one position earlier. Masked columns point at position 0.
        target_pos = starts.unsqueeze(1) + column - (width - lengths).unsqueeze(1)
        target_pos = torch.where(completion_mask.bool(), target_pos, torch.ones_like(target_pos))
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.decoder(
                input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False
            ).last_hidden_state
            self.forward_passes += 1
            if width == 0:
                empty = hidden.new_zeros(len(items), 0)
                return empty, empty
            targets = input_ids.gather(1, target_pos)
            predicting = hidden.gather(1, (target_pos - 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            if self.fused_head:
                return linear_selective_log_softmax(predicting, self.lm_head.weight, targets), completion_mask
            logits = self.lm_head(predicting)
        return selective_log_softmax(logits, targets), completion_mask

    # ----- learning -----
    def grpo_step(self, items: list[GrpoItem], loss: LossConfig) -> StepResult:
        """One optimizer step over all items (micro-batches with gradient accumulation)."""
        _check_grpo_items(items, loss)
        n = len(items)
        max_length = loss.max_length or max(len(it.completion_ids) for it in items)
        order = sorted(range(n), key=lambda i: len(items[i].context_ids) + len(items[i].completion_ids))
        totals = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "tokens": 0.0}
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        try:
            for start in range(0, n, loss.micro_batch_size):
                chunk = [items[i] for i in order[start : start + loss.micro_batch_size]]
                ref_logp = None
                if loss.beta != 0.0:
                    with torch.no_grad(), self.model.disable_adapter():
                        ref_logp, _ = self._completion_logprobs(chunk)
                logp, mask = self._completion_logprobs(chunk)
                old = _old_logprobs(chunk, mask) if any(it.old_logprobs is not None for it in chunk) else None
                if old is not None:  # items without old log-probs are on-policy: ratio 1
                    old = torch.where(torch.isnan(old), logp.detach(), old)
                terms = grpo_loss(
                    logp,
                    mask,
                    torch.tensor([it.advantage for it in chunk], device=self.device),
                    loss_type=loss.type,
                    old_logp=old,
                    ref_logp=ref_logp,
                    weights=torch.tensor([it.weight for it in chunk], device=self.device),
                    beta=loss.beta,
                    clip_eps=loss.clip_eps,
                    clip_eps_high=loss.clip_eps_high,
                    num_sequences=n,
                    max_length=max_length,
                )
                terms.loss.backward()
                totals["loss"] += float(terms.loss.detach())
                totals["kl"] += float(terms.kl_sum)
                totals["clipped"] += float(terms.clipped_tokens)
                totals["tokens"] += float(terms.tokens)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, loss.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise FloatingPointError("the gradient is not finite; the step was not applied")
            for group in self.optimizer.param_groups:
                group["lr"] = (
                    loss.learning_rate if loss.learning_rate is not None else self.base_learning_rate
                )
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
        self.step += 1
        self.adapter_version += 1
        return StepResult(
            loss=totals["loss"],
            kl=totals["kl"] / n,
            clip_fraction=totals["clipped"] / max(totals["tokens"], 1.0),
            grad_norm=grad_norm,
            tokens=int(totals["tokens"]),
            adapter_version=self.adapter_version,
            step=self.step,
        )

    # ----- state for checkpoints -----
    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the adapter weights; raises ValueError (changing nothing) when names or shapes differ."""
        from peft import set_peft_model_state_dict

        current = self.adapter_state()
        if set(state) != set(current):
            missing, extra = sorted(set(current) - set(state))[:3], sorted(set(state) - set(current))[:3]
            raise ValueError(
                f"adapter tensors do not match this model (missing {missing}, unexpected {extra})"
            )
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(current[key].shape):
                raise ValueError(
                    f"adapter tensor {key} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(current[key].shape)}"
                )
        set_peft_model_state_dict(self.model, state)
        if self.merged_decoder is not None:  # the adapter changed but adapter_version may not: merge again
            self.merged_decoder.invalidate()

    # ----- helpers -----
    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pad(sequences, left=True)

    def _right_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pad(sequences, left=False)

    def _pad(self, sequences: list[list[int]], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            if seq:
                span = slice(width - len(seq), width) if left else slice(0, len(seq))
                ids[row, span] = torch.tensor(seq, dtype=torch.long)
                mask[row, span] = 1
        return ids.to(self.device), mask.to(self.device)


def _join_cache(cache, mask: torch.Tensor, new_cache, new_mask: torch.Tensor) -> torch.Tensor:
    """Append new_cache's rows to cache (in place), left-padding the shorter one; return the joined mask.

    Keys already carry their rotary positions, so zero-filled, masked-out slots on the left change nothing.
    """
    width = max(mask.shape[1], new_mask.shape[1])

    def pad(tensor: torch.Tensor, to: int, dim: int) -> torch.Tensor:
        missing = to - tensor.shape[dim]
        if missing == 0:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    for layer, new_layer in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([pad(layer.keys, width, -2), pad(new_layer.keys, width, -2)])
        layer.values = torch.cat([pad(layer.values, width, -2), pad(new_layer.values, width, -2)])
    return torch.cat([pad(mask, width, 1), pad(new_mask, width, 1)])


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _old_logprobs(items: list[GrpoItem], mask: torch.Tensor) -> torch.Tensor:
    old = torch.full(mask.shape, float("nan"), device=mask.device)
    width = mask.shape[1]
    for row, it in enumerate(items):
        if it.old_logprobs is not None and it.old_logprobs:
            old[row, width - len(it.old_logprobs) :] = torch.tensor(it.old_logprobs, device=mask.device)
    return torch.where(mask.bool(), old, torch.zeros_like(old))


def _check_grpo_items(items: list[GrpoItem], loss: LossConfig) -> None:
    if not items:
        raise ValueError("items: at least one item is required")
    if loss.type not in ("grpo", "dr_grpo", "legacy"):
        raise ValueError(f"loss.type: unknown loss type {loss.type!r}")
    for i, it in enumerate(items):
        if not it.completion_ids:
            raise ValueError(f"items[{i}].completion: must contain at least one token")
        if not math.isfinite(it.advantage):
            raise ValueError(f"items[{i}].advantage: must be finite")
        if not math.isfinite(it.weight):
            raise ValueError(f"items[{i}].weight: must be finite")
        if it.old_logprobs is not None:
            if len(it.old_logprobs) != len(it.completion_ids):
                raise ValueError(
                    f"items[{i}].old_logprobs: {len(it.old_logprobs)} values for "
                    f"{len(it.completion_ids)} completion tokens"
                )
            if not all(math.isfinite(x) for x in it.old_logprobs):
                raise ValueError(f"items[{i}].old_logprobs: must be finite")


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _make_optimizer(params, settings: TrainerSettings, device: torch.device):
    if device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


# ----- loading -----
def load_student(settings: TrainerSettings) -> Student:
    """Resolve the model source, load the backend that fits the machine, and attach a fresh LoRA adapter."""
    torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
    torch.manual_seed(settings.seed)  # LoRA A matrices are random; B starts at zero
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolved = resolve_model(settings.model_source, settings.model_cache_dir)
    want_unsloth = settings.backend == "unsloth" or (
        settings.backend == "auto"
        and device.type == "cuda"
        and importlib.util.find_spec("unsloth") is not None
    )
    if want_unsloth and resolved.kind != "random":
        model, tokenizer = _load_unsloth(resolved.path, settings)
        backend = "unsloth"
    else:
        model, tokenizer = _load_transformers(resolved, settings, device)
        backend = "transformers"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Student(model, tokenizer, backend=backend, device=device, name=resolved.name, settings=settings)


def _load_unsloth(path: str, settings: TrainerSettings):
    from unsloth import FastLanguageModel  # imported only here: it patches transformers on import

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=settings.max_context, load_in_4bit=settings.load_in_4bit, dtype=None
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_target_modules),
        bias="none",
        random_state=settings.seed,
    )
    return model, tokenizer


def _load_transformers(resolved, settings: TrainerSettings, device: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        if resolved.kind == "random":
            config = AutoConfig.from_pretrained(resolved.path)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            kwargs: dict = {"dtype": torch.float32}
            if device.type == "cuda":
                kwargs["dtype"] = torch.bfloat16
                if settings.load_in_4bit and importlib.util.find_spec("bitsandbytes") is not None:
                    from transformers import BitsAndBytesConfig

                    kwargs["quantization_config"] = BitsAndBytesConfig(
                        load_in_4bit=True,
                        bnb_4bit_quant_type="nf4",
                        bnb_4bit_compute_dtype=torch.bfloat16,
                        bnb_4bit_use_double_quant=True,
                    )
            model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except ModelSourceError:
        raise
    except Exception as exc:  # corrupt weights, unreadable tokenizer, unknown architecture
        raise ModelSourceError(f"model_source: cannot load {resolved.path}: {exc}") from exc
    if getattr(model, "quantization_config", None) is None:
        model.to(device)
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if device.type == "cuda":
        _speed_up_cuda(model, settings)
    return model, tokenizer


def _speed_up_cuda(model, settings: TrainerSettings) -> None:
    """Activation checkpointing, TF32 for what stays float32, and a compiled decoder layer (bench/RESULTS.md)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    if settings.gradient_checkpointing:  # only active in train mode, i.e. inside grpo_step
        model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if settings.compile_layers:
        from torch import _dynamo

        # One compiled code object serves every layer; variants: train / no-grad / inference mode, adapter on or
        # off, and a few shapes until dynamo marks batch and length dynamic.
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
        for layer in model.get_base_model().model.layers:
            layer.compile()
        model.compiled_layers = True
