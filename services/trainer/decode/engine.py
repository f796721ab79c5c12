"""The decode engine: continuous batching over fixed KV slots, one decode loop for every model the trainer serves.

    engine = DecodeEngine(provide_model, tokenizer, eos_ids=..., device=..., config=DecodeConfig.for_device(...))
    results = engine.generate([("student", request), ("base", request)], admit=..., on_done=..., finish=...)

Each loop iteration: take in requests that arrived (`admit`) and prefill them into free slots (lane.py); sample
every live row's next token (sampler.py); read the tokens on the host, where rows that hit end of sequence, a
stop string (stops.py) or max_tokens leave their slot; and one decode forward per lane (a CUDA graph replay on
CUDA, graphs.py), which on CUDA is launched before the host reads the tokens (DecodeConfig.overlap), so the
host's bookkeeping hides behind the device's work. On CPU the joining rows' prefill instead runs on a thread of its
own while the live rows take their steps (DecodeConfig.concurrent_prefill), and they join at the first step after
it is done; the loop never waits for it while it has rows to step. Rows of the
student and of base decode in the same loop (two lanes, two forwards per step), so a batch never waits for the
other model's.

What it does not know: HTTP, queues, adapters. `provide_model(lane)` returns the model to decode a lane with and
an epoch that changes whenever that model's weights change (cached prefixes are then dropped).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .attention import register
from .lane import Lane, Row
from .stops import StopChecker

# Rows per decode step on CUDA, one graph per bucket and window: fine steps where batches usually are.
CUDA_ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass
class DecodeConfig:
    slots: int = 32  # rows per lane (the batcher's max_batch_size)
    cuda_graphs: bool = True  # on CUDA only
    row_buckets: tuple[int, ...] | None = (
        None  # None: a step covers exactly the slots up to the highest live one
    )
    window_step: int = 1  # the attention window is rounded up to a multiple of this
    initial_capacity: int = 256  # positions per slot to start with (doubles as prompts need)
    initial_slots: int = 64  # slots with memory to start with (doubles as rows need, up to `slots`)
    max_prefill_tokens: int = 8192  # padded prompt tokens per prefill forward
    compile: bool = False  # torch.compile the decode step (inside its graphs); costs a compilation at start
    # Launch each decode step before the host reads the tokens it feeds, so the host's bookkeeping of a step runs
    # while the device computes it. The price: a row that just finished is computed once more (its result is
    # dropped). Worth it where the device runs asynchronously (CUDA).
    overlap: bool = False
    # Pad prefill batches to bucketed shapes (units to a power of two, width and window rounded up), so that a
    # shape that recurs is replayed as a graph (CUDA); off, each prefill runs at its exact shape.
    prefill_buckets: bool = False
    # Prefill joining rows on a thread of their own while the loop decodes the live ones (the rows join at the
    # first step after their prefill, one prefill at a time): a CPU's decode step barely uses a second core, and
    # the two touch disjoint slots (Lane.plan).
    # Off on CUDA, where both would queue on one stream and the overlapped order already hides the host's work.
    concurrent_prefill: bool = False
    # Prompts of a prefill end to end, so its projections compute real tokens only (lane.py, Lane._prefill); off,
    # each is padded to the longest (the layout before packing, kept to compare the two side by side).
    pack_prefill: bool = True
    # Prefills attend through torch's flash varlen attention on the packed sequence as it is, over their own new
    # keys or over keys gathered from their slots where they reuse cached prefixes (CUDA, where
    # attention.flash_varlen serves); off, through the padded layout.
    varlen_prefill: bool = True
    seed: int = 0  # for the seeds of requests without one

    @classmethod
    def for_device(cls, device: torch.device, **overrides) -> DecodeConfig:
        """On CUDA: bucketed shapes (a graph per shape) and overlapped steps. On CPU: exact shapes (no graphs, so
        padding would only cost), steps in order (the host waits for each step anyway) and prefills beside them."""
        if device.type == "cuda":
            slots = overrides.get("slots", cls.slots)
            steps = tuple(range(CUDA_ROW_BUCKETS[-1] + 128, slots, 128))  # past 256: every 128 rows
            buckets = tuple(b for b in (*CUDA_ROW_BUCKETS, *steps) if b < slots)
            overrides = {
                "row_buckets": (*buckets, slots),
                "window_step": 128,
                "overlap": True,
                "prefill_buckets": True,
                **overrides,
            }
        else:
            overrides = {"concurrent_prefill": True, **overrides}
        return cls(**overrides)


class DecodeEngine:
    def __init__(
        self,
        provide_model: Callable[[str], tuple[Any, Any]],
        tokenizer,
        *,
        eos_ids: list[int],
        device: torch.device,
        config: DecodeConfig,
    ):
        self.provide_model = provide_model
        self.eos_ids = frozenset(eos_ids)
        self.device = device
        self.config = config
        self.attn_implementation = register()
        self.lanes: dict[str, Lane] = {}
        self.tokenizer = tokenizer
        self._stops: StopChecker | None = None
        self._seeds = random.Random(config.seed)
        self.forward_passes = 0  # prefill and decode forwards, all lanes
        self.prefill_passes = 0  # of which prefill forwards (joining rows)
        # host time spent in the joining rows' prefills (their inputs built and copied, their forwards launched)
        self.prefill_seconds = 0.0
        self.decode_steps = 0  # decode forwards, all lanes
        # rows those forwards decoded, in all (decoded_rows / decode_steps: the mean batch)
        self.decoded_rows = 0
        self.place_wait_seconds = 0.0  # rows' time from joining the run to having a slot, in all
        # config.concurrent_prefill's thread, made when first needed
        self._prefiller: ThreadPoolExecutor | None = None

    @property
    def read_wait_seconds(self) -> float:
        """Host seconds spent waiting for the device's sampled tokens, all lanes (CUDA; 0 elsewhere)."""
        return sum(lane.read_wait_seconds for lane in self.lanes.values())

    @property
    def idle_launches(self) -> int:
        """Loop iterations that found the device idle, all lanes: the host, not the device, set the pace."""
        return sum(lane.idle_launches for lane in self.lanes.values())

    @staticmethod
    def unsupported(model) -> str | None:
        """Why this engine cannot decode `model` correctly (the caller then keeps another decoder), or None."""
        config = model.config
        layer_types = set(getattr(config, "layer_types", None) or [])
        if layer_types - {"full_attention"}:
            return f"attention layers of types {sorted(layer_types)} (the slots attend over every position)"
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            return "sliding-window attention"
        if getattr(config, "attn_logit_softcapping", None):
            return "soft-capped attention logits"
        if not model._can_set_attn_implementation():
            return f"{type(model).__name__} does not route attention through transformers' AttentionInterface"
        return None

    def lane(self, name: str) -> Lane:
        model, epoch = self.provide_model(name)
        lane = self.lanes.get(name)
        if lane is None or lane.model is not model:
            model.set_attn_implementation(self.attn_implementation)
            if model.config._attn_implementation != self.attn_implementation:  # never decode with plain SDPA
                raise RuntimeError(
                    f"{type(model).__name__} kept attention {model.config._attn_implementation}"
                )
            lane = self.lanes[name] = Lane(
                model, slots=self.config.slots, config=self.config, device=self.device
            )
        lane.set_epoch(epoch)
        return lane

    @property
    def stops(self) -> StopChecker:
        if self._stops is None:
            vocab = next(iter(self.lanes.values())).logits.shape[1]
            self._stops = StopChecker(self.tokenizer, vocab)
        return self._stops

    @torch.inference_mode()
    def generate(
        self,
        jobs: list[tuple[str, Any]],
        *,
        finish: Callable[..., Any],
        admit: Callable[[int], list[tuple[str, Any]]] | None = None,
        on_done: Callable[[int, list[Any]], None] | None = None,
    ) -> list[list[Any]]:
        """Generate every request's n samples; returns them per request, in the order of jobs and then of the
        admitted ones. `admit(free_rows)` may hand over more (lane, request) jobs between steps; `on_done(index,
        samples)` reports a request as soon as its last sample is done, and then its samples are not kept (its entry
        in the returned list is empty); `finish(request, ids, logprobs, tops, finish_reason, stop_cut)` turns a
        finished row into the caller's sample object."""
        run = _Run(self, finish, on_done)
        for name, request in jobs:
            run.add(self.lane(name), request)
        # A prefill running beside the decode steps (config.concurrent_prefill). It may take several steps: the
        # loop steps the live rows meanwhile, and its rows join at the first step after it is done.
        joining: Future | None = None
        try:
            while run.pending or run.live() or joining is not None:
                if admit is not None and (run.live() or joining is not None):
                    by_name: dict[str, Lane] = {}  # looked up once per admission, not per request
                    for name, request in admit(max(self.config.slots - run.rows_in_flight(), 0)):
                        if name not in by_name:
                            by_name[name] = self.lane(name)
                        run.add(by_name[name], request)
                for lane in run.lanes:
                    lane.note_launch()
                if joining is not None and (joining.done() or not run.live()):
                    self._join(run, *joining.result())
                    joining = None  # nothing of the joined rows stays referenced from here
                if joining is None:  # one prefill at a time: while one runs, the waiting rows go to the next
                    if self.config.concurrent_prefill and run.live():
                        joining = self._prefill_beside(run)
                    else:
                        self._place(run)
                lanes = [lane for lane in run.lanes if lane.live_count]
                for lane in lanes:
                    lane.sample()
                if self.config.overlap:  # decode first: the host reads the tokens while the device runs
                    for lane in lanes:
                        self._count_step(lane)
                        lane.step()
                for lane in lanes:
                    self._collect(lane, run)
                if not self.config.overlap:
                    for lane in lanes:
                        if lane.live_count:
                            self._count_step(lane)
                            lane.step()
        finally:
            # after a failure: the prefill thread must be done with the cache before anything else touches it
            if joining is not None:
                with contextlib.suppress(Exception):
                    joining.result()
            for lane in run.lanes:  # after a failure, no row of this run may keep a slot
                lane.reserved.clear()
                for slot, row in enumerate(lane.rows):
                    if row is not None:
                        lane.release(slot, keep_prefix=False)
        return [samples or [] for samples in run.results]

    def _count_step(self, lane: Lane) -> None:
        self.forward_passes += 1
        self.decode_steps += 1
        self.decoded_rows += lane.live_count

    def _place(self, run: _Run) -> None:
        """Place the waiting rows and prefill them now, on this thread."""
        plans = self._plan(run, staged=False)
        if plans:
            self._join(run, *self._prefill_planned(plans))

    def _prefill_beside(self, run: _Run) -> Future | None:
        """Plan the waiting rows' places (this thread), then prefill them on the prefill thread while this one
        decodes the live rows; the future answers what _join needs. None when no row waits or fits."""
        plans = self._plan(run, staged=True)
        if not plans:
            return None
        if self._prefiller is None:
            # Half the intra-op threads, so the prefill and the step that runs beside it do not each spread over
            # every core (on 2 cores: one thread each, +4-6% tokens/s over two each in two rounds, bench/RESULTS.md).
            threads = max(1, torch.get_num_threads() // 2)
            self._prefiller = ThreadPoolExecutor(
                1, thread_name_prefix="decode-prefill", initializer=torch.set_num_threads, initargs=(threads,)
            )
        return self._prefiller.submit(self._prefill_planned, plans)

    def _plan(self, run: _Run, *, staged: bool) -> list[tuple[Lane, list[Any], torch.Tensor]]:
        """Per lane: the waiting rows given slots (no longer pending), and the logits their prefill fills (a
        staged buffer where it runs beside decode steps, which write the lane's own)."""
        plans = []
        for lane in run.lanes:
            waiting = [row for row in run.pending if row_lane(run, row) is lane]
            plan = lane.plan(waiting) if waiting else []
            if plan:
                plans.append((lane, plan, lane.staged_logits() if staged else lane.logits))
        if plans:
            planned = {id(row) for _, plan, _ in plans for unit in plan for row in unit.rows}
            run.pending = [row for row in run.pending if id(row) not in planned]
            run.prefilling = len(planned)
        return plans

    @torch.inference_mode()  # per thread: the prefill thread's own
    def _prefill_planned(self, plans: list[tuple[Lane, list[Any], torch.Tensor]]) -> tuple[list, int, float]:
        started = time.perf_counter()
        passes = sum(lane.prefill(plan, logits) for lane, plan, logits in plans)
        return plans, passes, time.perf_counter() - started

    def _join(
        self, run: _Run, plans: list[tuple[Lane, list[Any], torch.Tensor]], passes: int, seconds: float
    ) -> None:
        now = time.perf_counter()
        placed = [row for lane, plan, logits in plans for row in lane.join(plan, logits)]
        run.prefilling = 0
        self.prefill_seconds += seconds
        self.place_wait_seconds += sum(now - row.added_at for row in placed)
        self.forward_passes += passes
        self.prefill_passes += passes

    def _collect(self, lane: Lane, run: _Run) -> None:
        tokens, picked, top_values, top_ids = lane.read()
        for slot, row in lane.live_rows():
            token = tokens[slot]
            row.tokens.append(token)
            request = row.request
            if request.logprobs is not None:
                row.logprobs.append(picked[slot])
                if request.logprobs:
                    k = request.logprobs
                    row.tops.append(list(zip(top_ids[slot][:k], top_values[slot][:k], strict=False)))
            if request.on_token is not None:
                request.on_token(
                    row.sample,
                    token,
                    row.logprobs[-1] if request.logprobs is not None else None,
                    row.tops[-1] if request.logprobs else None,
                )
            if token in self.eos_ids:
                row.finish = "stop"
            elif (
                row.stops
                and self.stops.may_end(token, row.stops)
                and (cut := self.stops.position(row.tokens, row.stops)) is not None
            ):
                row.finish, row.stop_cut = "stop", cut
            elif len(row.tokens) >= request.max_tokens:
                row.finish = "length"
            else:
                continue  # it goes on: step() feeds the token (or did, in the overlapped order)
            lane.release(slot)
            run.done(row)


def row_lane(run: _Run, row: Row) -> Lane:
    return run.lane_of[id(row)]


class _Run:
    """The requests of one generate call and what became of them."""

    def __init__(self, engine: DecodeEngine, finish, on_done):
        self.engine, self.finish, self.on_done = engine, finish, on_done
        self.requests: list[Any] = []  # None once done
        self.rows: list[list[Row]] = []
        self.remaining: list[int] = []
        self.results: list[list[Any] | None] = []
        self.pending: list[Row] = []
        self.prefilling = 0  # rows given slots and being prefilled: neither pending nor live
        self.lanes: list[Lane] = []
        self.lane_of: dict[int, Lane] = {}

    def add(self, lane: Lane, request) -> None:
        index = len(self.requests)
        self.requests.append(request)
        self.remaining.append(request.n)
        self.results.append(None)
        if lane not in self.lanes:
            self.lanes.append(lane)
        stops = tuple(request.stop)
        rows = []
        for sample in range(request.n):
            if request.seed is None:
                seed = self.engine._seeds.getrandbits(62)
            else:
                seed = (request.seed * 1_000_003 + sample) % (2**62)
            row = Row(request, index, sample, seed, stops)
            self.lane_of[id(row)] = lane
            rows.append(row)
        self.rows.append(rows)
        self.pending.extend(rows)

    def live(self) -> int:
        return sum(lane.live_count for lane in self.lanes)

    def rows_in_flight(self) -> int:
        return self.live() + self.prefilling + len(self.pending)

    def done(self, row: Row) -> None:
        self.remaining[row.index] -= 1
        if self.remaining[row.index]:
            return
        request, rows = self.requests[row.index], self.rows[row.index]
        samples = [
            self.finish(request, r.tokens, r.logprobs, r.tops, r.finish or "length", r.stop_cut) for r in rows
        ]
        # Nothing of a finished request stays with the run: under steady traffic a continuous run never ends, and
        # what it kept would grow without bound (and lengthen every garbage collection with it).
        self.requests[row.index], self.rows[row.index] = None, []
        for r in rows:
            del self.lane_of[id(r)]
        if self.on_done is not None:
            self.on_done(row.index, samples)  # reported here, not kept for the returned list
        else:
            self.results[row.index] = samples
