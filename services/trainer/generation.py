"""The decode loop: many generation requests in one batched, continuously refilled loop over the student.

Prompts are left-padded and prefilled once each; the KV cache is then expanded so a request's n samples share
its prefill. Finished rows leave the batch (their cache rows are dropped). Between decode steps `admit(free_rows)`
may hand over new requests, which are prefilled and joined to the running batch; `on_done(index, samples)`
reports each request as soon as all its samples are finished. Generation runs through plain copies of the model
with the adapter merged in where it can (decode_weights.py), else through the model as the backend has generation
call it (Student.decoding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .decode.stops import stop_position
from .items import DecodedRow, Finished, GenerationRequest
from .padding import pad, positions
from .sampling import sample_next

if TYPE_CHECKING:
    from .student import Student

Admit = Callable[[int], list[GenerationRequest]]
OnDone = Callable[[int, list[Finished]], None]


class DecodeLoop:
    """Runs generation for one Student; the Student's `generate` is its only caller."""

    def __init__(self, student: Student):
        self.student = student

    @torch.inference_mode()
    def generate(
        self,
        requests: list[GenerationRequest],
        *,
        use_adapter: bool = True,
        admit: Admit | None = None,
        on_done: OnDone | None = None,
    ) -> list[list[Finished]]:
        s = self.student
        # Decoding runs the layers eagerly: compiled layers would recompile for every KV-cache length.
        stance = torch.compiler.set_stance("force_eager") if s.compiled else contextlib.nullcontext()
        with stance, s.decoding(use_adapter) as model:
            return self._run(model, list(requests), admit, on_done)

    def _prefill(
        self, model: Any, requests: list[GenerationRequest]
    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Prefill prompts once each; return (cache, mask, last logits) expanded to one row per sample."""
        from transformers import DynamicCache

        s = self.student
        input_ids, mask = pad([r.prompt_ids for r in requests], s.pad_id, s.device, left=True)
        cache = DynamicCache(config=s.model.config)
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions(mask),
            use_cache=True,
            logits_to_keep=1,
            **{s.cache_arg: cache},
        )
        s.forward_passes += 1
        expand = torch.tensor([i for i, r in enumerate(requests) for _ in range(r.n)], device=s.device)
        cache.batch_select_indices(expand)
        return cache, mask[expand], out.logits[:, -1, :][expand]

    def _run(
        self, model: Any, requests: list[GenerationRequest], admit: Admit | None, on_done: OnDone | None
    ) -> list[list[Finished]]:
        s = self.student
        owner: list[int] = []  # row -> request index
        sample_index: list[int] = []
        generators: list[torch.Generator | None] = []
        remaining: list[int] = []  # per request: samples not finished yet
        generated: list[list[int]] = []
        logprobs: list[list[float]] = []
        tops: list[list[list[tuple[int, float]]]] = []
        finish: list[str | None] = []
        stop_cut: list[int | None] = []
        results: list[list[Finished] | None] = []
        rows_of: list[list[int]] = []  # per request: its rows
        request_of: dict[int, GenerationRequest] = {}  # the requests not yet answered, by index

        def add_rows(new_requests: list[GenerationRequest]) -> list[int]:
            first_row = len(owner)
            for request in new_requests:
                index = len(remaining)
                request_of[index] = request
                remaining.append(request.n)
                results.append(None)
                rows_of.append(list(range(len(owner), len(owner) + request.n)))
                for j in range(request.n):
                    owner.append(index)
                    sample_index.append(j)
                    generators.append(self._row_generator(request, j))
                    generated.append([])
                    logprobs.append([])
                    tops.append([])
                    finish.append(None)
                    stop_cut.append(None)
            return list(range(first_row, len(owner)))

        cache, mask, logits = self._prefill(model, requests)
        rows = add_rows(requests)  # live rows, in cache order
        while rows:
            if admit is not None and (joining := admit(self._free_rows(len(rows)))):
                new_cache, new_mask, new_logits = self._prefill(model, joining)
                mask = join_cache(cache, mask, new_cache, new_mask)
                logits = torch.cat([logits, new_logits])
                rows = rows + add_rows(joining)
            reqs = [request_of[owner[r]] for r in rows]
            next_ids = sample_next(
                logits,
                [q.temperature for q in reqs],
                [q.top_p for q in reqs],
                [generators[r] for r in rows],
                s.sampling_generator,
            )
            want_logprobs = [q.logprobs is not None for q in reqs]
            picked: list[float] = []
            top_v = top_i = None
            if any(want_logprobs):
                log_dist = torch.log_softmax(logits.float(), dim=-1)
                picked = log_dist.gather(-1, next_ids.unsqueeze(1)).squeeze(1).tolist()
                k_max = max(q.logprobs or 0 for q in reqs)
                if k_max:
                    top_v, top_i = log_dist.topk(k_max, dim=-1)
            next_list = next_ids.tolist()
            keep = []
            for k, r in enumerate(rows):
                token, req = next_list[k], reqs[k]
                generated[r].append(token)
                if want_logprobs[k]:
                    logprobs[r].append(picked[k])
                    if req.logprobs and top_i is not None and top_v is not None:
                        tops[r].append(
                            list(
                                zip(
                                    top_i[k, : req.logprobs].tolist(),
                                    top_v[k, : req.logprobs].tolist(),
                                    strict=True,
                                )
                            )
                        )
                if req.on_token is not None:
                    req.on_token(
                        sample_index[r],
                        token,
                        logprobs[r][-1] if want_logprobs[k] else None,
                        tops[r][-1] if req.logprobs and top_i is not None else None,
                    )
                if token in s.eos_ids:
                    finish[r] = "stop"
                elif req.stop and (cut := stop_position(s.tokenizer, generated[r], req.stop)) is not None:
                    finish[r], stop_cut[r] = "stop", cut
                elif len(generated[r]) >= req.max_tokens:
                    finish[r] = "length"
                else:
                    keep.append(k)
                    continue
                remaining[owner[r]] -= 1
                if remaining[owner[r]] == 0:  # the request's last sample: report it now
                    index = owner[r]
                    done = [
                        s.finish_row(
                            request_of[index],
                            DecodedRow(
                                generated[row],
                                logprobs[row],
                                tops[row],
                                finish[row] or "length",
                                stop_cut[row],
                            ),
                        )
                        for row in rows_of[index]
                    ]
                    if on_done is not None:  # reported, not kept (as the slot engine's generate)
                        on_done(index, done)
                        # Nothing of it stays: under steady traffic the loop never ends (see decode/engine.py).
                        for row in rows_of[index]:
                            generated[row], logprobs[row], tops[row], generators[row] = [], [], [], None
                    else:
                        results[index] = done
                    del request_of[index]
            if not keep:
                break
            if len(keep) < len(rows):
                index_tensor = torch.tensor(keep, device=s.device)
                cache.batch_select_indices(index_tensor)
                mask = mask[index_tensor]
                next_ids = next_ids[index_tensor]
                rows = [rows[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            out = model(
                input_ids=next_ids.unsqueeze(1).to(s.device),
                attention_mask=mask,
                position_ids=(mask.sum(1, keepdim=True) - 1),
                use_cache=True,
                **{s.cache_arg: cache},
            )
            s.forward_passes += 1
            logits = out.logits[:, -1, :]
        return [samples or [] for samples in results]

    def _free_rows(self, live_rows: int) -> int:
        return max(self.student.max_batch_rows - live_rows, 0)

    def _row_generator(self, request: GenerationRequest, sample_index: int) -> torch.Generator | None:
        if request.seed is None:
            return None
        seed = (request.seed * 1_000_003 + sample_index) % (2**63)
        return torch.Generator(device=self.student.device).manual_seed(seed)


def join_cache(cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor) -> torch.Tensor:
    """Append new_cache's rows to cache (in place), left-padding the shorter one; return the joined mask.

    Keys already carry their rotary positions, so zero-filled, masked-out slots on the left change nothing.
    """
    width = max(mask.shape[1], new_mask.shape[1])

    def pad_left(tensor: torch.Tensor, to: int, dim: int) -> torch.Tensor:
        missing = to - tensor.shape[dim]
        if missing == 0:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    for layer, new_layer in zip(cache.layers, new_cache.layers, strict=True):
        layer.keys = torch.cat([pad_left(layer.keys, width, -2), pad_left(new_layer.keys, width, -2)])
        layer.values = torch.cat([pad_left(layer.values, width, -2), pad_left(new_layer.values, width, -2)])
    return torch.cat([pad_left(mask, width, 1), pad_left(new_mask, width, 1)])
