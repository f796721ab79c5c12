"""The student: one causal LM with a LoRA adapter, its tokenizer and optimizer, and the state that goes with it
(step, adapter version, counters). "base" = the same model with the adapter disabled (no copy).

Its three operations live in modules of their own and are reached through it: `generate` (generation.py, the
decode loop), `logprobs` (scoring.py) and `grpo_step` (learning.py). It knows nothing of HTTP or of queues;
exactly one thread (the batcher's worker) calls it at a time. loading.py builds it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from services.protocol import LossSettings

from .backends import Backend
from .decode_weights import MergedDecoder, choose_decode_dtype, merge_blocker
from .detokenize import finish_sample
from .generation import Admit, DecodeLoop, OnDone
from .items import DecodedRow, Finished, GenerationRequest, GrpoItem, ScoreItem, StepResult
from .learning import grpo_step
from .packed_linear import packing_available
from .scoring import score
from .settings import TrainerSettings
from .slot_generation import SlotGeneration

log = logging.getLogger(__name__)


class Student:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        optimizer: torch.optim.Optimizer,
        *,
        backend: Backend,
        device: torch.device,
        name: str,
        settings: TrainerSettings,
    ):
        self.model = model  # a peft model
        self.tokenizer = tokenizer
        self.optimizer = optimizer
        self.backend = backend.name
        self.device = device
        self.name = name
        self.max_context = settings.max_context
        self.max_batch_rows = settings.max_batch_size
        self.eos_ids = _eos_ids(model, tokenizer)
        # Whether generation answers Samples (text included) or DecodedRows (ids only), which the caller turns
        # into Samples: the engine process's core turns this off, so the HTTP process detokenizes instead of
        # the decode thread.
        self.detokenize = True
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.step = 0
        self.adapter_version = 0
        self.forward_passes = 0  # model forward calls, reported by /health
        self.last_step_key: str | None = None
        self.last_step_result: dict[str, Any] | None = (
            None  # the last /grpo/step answer, for a retried step_key
        )
        self.sampling_generator = torch.Generator(device=device).manual_seed(settings.seed)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.base_learning_rate = settings.learning_rate
        self.micro_batch_tokens = settings.micro_batch_tokens or default_micro_batch_tokens(device)
        causal_lm = model.get_base_model()
        self.decoder = causal_lm.model  # the transformer stack: hidden states without the lm_head
        self.lm_head = causal_lm.get_output_embeddings()
        self.vocab_size: int = self.lm_head.weight.shape[0]  # token ids a request may name
        # The output projection fused into the log-softmax needs a frozen, bias-free lm_head (Llama, Qwen, SmolLM2).
        self.fused_head = (
            getattr(self.lm_head, "bias", None) is None and not self.lm_head.weight.requires_grad
        )
        # bf16 autocast on CUDA: the float32 LoRA weights join the bf16 matmuls instead of upcasting activations.
        self.autocast = device.type == "cuda"
        self.compiled = backend.compiled_layers
        # transformers 5.x renamed the KV-cache argument from past_key_values to cache.
        self.cache_arg = (
            "cache" if "cache" in inspect.signature(causal_lm.forward).parameters else "past_key_values"
        )
        model.eval()
        # Generation decodes through plain copies with the adapter merged in (decode_weights.py: peft's wrappers
        # cost ~35% of a decode step); None = through the model as the backend has it, where merging is not possible.
        blocker = backend.merged_decode_off or merge_blocker(model)
        model_dtype = causal_lm.dtype
        decode_dtype = choose_decode_dtype(settings.decode_dtype, model_dtype, device)
        pack = (
            settings.decode_packed
            and device.type == "cpu"
            and not settings.decode_compile  # dynamo cannot trace oneDNN's opaque packed weights
            and packing_available(decode_dtype)
        )
        self.merged_decoder = (
            MergedDecoder(model, dtype=decode_dtype, pack=pack, fuse=not settings.decode_compile)
            if blocker is None
            else None
        )
        # the weights' dtype generation decodes with (sampled log-probs come from it; /health reports it)
        self.decode_dtype = decode_dtype if blocker is None else model_dtype
        if blocker is not None:
            log.info("generation runs through the peft model: the adapter cannot be merged with %s", blocker)
            if settings.decode_dtype == "bfloat16" and model_dtype != torch.bfloat16:
                log.warning(
                    "TRAINER_DECODE_DTYPE=bfloat16 has no effect: generation runs through the peft model"
                )
        self.backend_decoding = backend.decoding
        self.decode_loop = DecodeLoop(self)
        # The slot engine (slot_generation.py, decode/) where the adapter merges, unless TRAINER_DECODE_ENGINE=loop.
        self.slot_decoder = SlotGeneration.for_student(self, settings)

    def adapter(self, enabled: bool) -> AbstractContextManager[Any]:
        """Context in which the model runs with its LoRA adapter on ("student") or off ("base")."""
        return contextlib.nullcontext() if enabled else self.model.disable_adapter()

    @contextlib.contextmanager
    def decoding(self, use_adapter: bool) -> Iterator[Any]:
        """The model generation calls, with the adapter on or off: a merged plain copy where there is one, else
        the model as the backend has generation call it (backends.py)."""
        if self.merged_decoder is not None:
            yield self.merged_decoder.model(use_adapter, self.adapter_version)
            return
        with self.adapter(use_adapter), self.backend_decoding(self.model) as model:
            yield model

    # ----- the three operations -----
    def generate(
        self,
        requests: list[GenerationRequest],
        *,
        use_adapter: bool = True,
        admit: Admit | None = None,
        on_done: OnDone | None = None,
    ) -> list[list[Finished]]:
        """Generate for many requests in one batched decode loop; returns each request's n samples (Samples, or
        DecodedRows where self.detokenize is off).

        Continuous batching: between decode steps `admit(free_rows)` may hand over new requests (their indices
        follow the earlier ones); `on_done(index, samples)` reports each request as soon as it is finished.
        """
        # merged_decoder is None: generation through the peft model, which only the loop does
        loop = self.slot_decoder if self.slot_decoder and self.merged_decoder else self.decode_loop
        return loop.generate(requests, use_adapter=use_adapter, admit=admit, on_done=on_done)

    def finish_row(self, request: GenerationRequest, row: DecodedRow) -> Finished:
        """A finished row as generation answers it: a Sample, or the row itself where detokenize is off."""
        return finish_sample(self.tokenizer, self.eos_ids, request, row) if self.detokenize else row

    @property
    def decodes_models_together(self) -> bool:
        """Whether "student" and "base" requests can share one decode loop (generate_models)."""
        return self.slot_decoder is not None and self.merged_decoder is not None

    def generate_models(
        self,
        jobs: list[tuple[str, GenerationRequest]],
        *,
        admit: Callable[[int], list[tuple[str, GenerationRequest]]] | None = None,
        on_done: OnDone | None = None,
    ) -> list[list[Finished]]:
        """As generate, for (model, request) jobs whose model is "student" or "base", all in one decode loop."""
        if self.slot_decoder is None or self.merged_decoder is None:
            raise RuntimeError(
                "student and base decode together only in the slot engine with a merged adapter"
            )
        return self.slot_decoder.generate_lanes(jobs, admit=admit, on_done=on_done)

    def logprobs(
        self, items: list[ScoreItem], *, use_adapter: bool = True, batch_size: int = 16
    ) -> list[list[float]]:
        """Per-token log-probs of each item's completion given its context, in padded batches."""
        return score(self, items, use_adapter=use_adapter, batch_size=batch_size)

    def grpo_step(self, items: list[GrpoItem], loss: LossSettings) -> StepResult:
        """loss.updates optimizer steps over the items (one by default); the adapter version goes up by one."""
        return grpo_step(self, items, loss)

    # ----- state for checkpoints -----
    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}

    def adapter_config(self) -> Any:
        """The peft LoraConfig of the adapter (rank, alpha, target modules), as adapter_config.json holds it."""
        return self.model.peft_config[self.model.active_adapter]

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
                    f"adapter tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(current[key].shape)}"
                )
        set_peft_model_state_dict(self.model, state)
        if self.merged_decoder is not None:  # the adapter changed but adapter_version may not: merge again
            self.merged_decoder.invalidate()


def default_micro_batch_tokens(device: torch.device) -> int:
    """Padded tokens per GRPO micro-batch when TRAINER_MICRO_BATCH_TOKENS is unset: a GPU wants few large
    passes; on a CPU the pass size buys little speed, and it bounds the step's memory."""
    return 16384 if device.type == "cuda" else 2048


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
