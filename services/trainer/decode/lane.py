"""One lane of the decode engine: a model, its slot cache, its prefix index, and the rows decoding in its slots.

The engine has a lane per model it decodes with ("student": the merged adapter, "base": the adapter off); both
step in the same loop, so a batch mixes their rows. Batch row r of a decode step is slot r: the step covers
slots [0, rows), rows not live there write to the scratch slot and are ignored, and the step's tensors (next
tokens, positions, sampling parameters, logits) are static per-slot buffers, so the step is the same kernels
every time for a given (rows, window) and is replayed as a CUDA graph (graphs.py).

Joining rows are prefilled eagerly: prompts that are equal share one prefill (n samples, or equal requests),
a prompt whose first tokens some slot already holds copies them and prefills only the rest (prefixes.py), and
a prompt that shares a prefix with another prompt joining at the same time waits one prefill pass for it.
"""

from __future__ import annotations

import array
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import PackedLayout, SlotAttention, flash_varlen
from .graphs import StepGraphs
from .prefixes import BLOCK, PrefixIndex, block_hashes
from .sampler import choose
from .slots import SlotCache, to_device

MAX_TOP_LOGPROBS = 20  # the API's limit on top_logprobs / logprobs


@dataclass(eq=False)
class Row:
    """One sample being generated: a request's j-th of n."""

    request: Any  # a GenerationRequest: prompt_ids, n, max_tokens, temperature, top_p, seed, stop, logprobs, on_token
    index: int  # the request's position in the generate call
    sample: int
    seed: int  # in [0, 2**62)
    stops: tuple[str, ...]
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    finish: str | None = None
    stop_cut: int | None = None
    # when it joined the engine's run (the engine's place_wait_s)
    added_at: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Unit:
    """Rows with one prompt, prefilled once: the first row's slot is computed, the others copy it."""

    prompt: list[int]
    rows: list[Row]
    hashes: list[int]
    source: int | None = None  # a slot already holding prompt[:reuse]
    after: _Unit | None = None  # or: a unit of this admission whose prompt starts with prompt[:reuse]
    reuse: int = 0
    slot: int = -1
    wave: int = 0


class Lane:
    def __init__(self, model, *, slots: int, config, device: torch.device):
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.config = config
        self.device = device
        self.slots = slots
        self.epoch: Any = None  # what the model's weights were when the cached prefixes were computed
        model_config = model.config
        heads = model_config.num_attention_heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        self.query_group = heads // kv_heads  # query heads per KV head
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        self.cache = SlotCache(
            layers=model_config.num_hidden_layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            slots=slots,
            capacity=config.initial_capacity,
            dtype=model.dtype,
            device=device,
            allocated=config.initial_slots,
        )
        self.index = PrefixIndex(slots)
        self.graphs = StepGraphs(config.cuda_graphs and device.type == "cuda")
        self.rows: list[Row | None] = [None] * slots
        self.live_count = 0
        # Slots a planned admission writes or reads while it is prefilled (its rows' slots and the slots it copies
        # prefixes from): no other row is given or moved into them until it joins (plan, prefill, join).
        self.reserved: set[int] = set()
        self._staged_logits: torch.Tensor | None = None  # where a concurrent prefill leaves its logits
        self.prefill_tokens = 0  # prompt tokens computed (not reused), a figure for tests and benchmarks
        self.reused_tokens = 0  # prompt tokens whose KV was copied from a slot or a shared prefill
        # Host copies of the per-slot parameters, uploaded when they change.
        self._pos = [0] * slots  # the position the slot's next fed token takes (= its valid KV length)
        self._live = [0] * slots
        self._seed = [0] * slots
        self._temperature = [0.0] * slots
        self._top_p = [1.0] * slots
        self._dirty = True
        # Static device buffers (their addresses are captured by the graphs).
        self._ints = torch.zeros(3, slots, dtype=torch.long, device=device)
        self.pos, self.live, self.seed = self._ints[0], self._ints[1], self._ints[2]
        self._floats = torch.zeros(2, slots, dtype=torch.float32, device=device)
        self.temperature, self.top_p = self._floats[0], self._floats[1]
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)  # sampled, then fed
        vocab = self.lm_head.out_features
        # One more row than slots: the scratch slot's, where prefill padding writes its logits.
        self.logits = torch.zeros(slots + 1, vocab, dtype=torch.float32, device=device)
        self.picked = torch.zeros(slots, dtype=torch.float32, device=device)
        self.top_values = torch.zeros(slots, MAX_TOP_LOGPROBS, dtype=torch.float32, device=device)
        self.top_ids = torch.zeros(slots, MAX_TOP_LOGPROBS, dtype=torch.long, device=device)
        self.slot_ids = torch.arange(slots, device=device)
        self.key_positions = torch.arange(self.cache.capacity, device=device)
        # what a varlen prefill gives transformers as its mask: attention ignores it, and a mask given stops
        # transformers from building one of its own
        self._no_mask = torch.zeros((1, 1, 1, 1), dtype=model.dtype, device=device)
        # torch's flash varlen attention (attention.flash_varlen): None on CPU, or where this torch or card lacks it
        self.varlen_attention = flash_varlen(device)
        self._mode: tuple[bool, bool, int, bool] = (False, False, 0, False)
        self._prefills_seen: set[tuple] = set()  # prefill shapes run once eagerly: the next is captured
        self._prefill_inputs: dict[tuple, torch.Tensor] = {}  # per captured prefill: its input buffer
        self._sampled: list[torch.Tensor] = []  # the last sample()'s choices, on the host (or on their way)
        self._sampled_ready: torch.cuda.Event | None = None
        self._stepped: torch.cuda.Event | None = None  # the last decode step's end on the device (CUDA)
        # Where a loop's time goes (CUDA): seconds the host waited in read() for the device, and launches that
        # found the device already done with everything before them (it idled: the host was the bottleneck).
        self.read_wait_seconds = 0.0
        self.idle_launches = 0
        # torch.compile fuses the step's elementwise kernels (norms, rotary, residuals: ~40 kernels per layer
        # eager); dynamic shapes, so one compilation serves every (rows, window) graph.
        self._decode_step = (
            torch.compile(self._decode_tensors, dynamic=True) if config.compile else self._decode_tensors
        )

    # ----- bookkeeping -----
    def set_epoch(self, epoch: Any) -> None:
        """The weights changed (a GRPO step, a loaded checkpoint): the cached prefixes are stale."""
        if epoch != self.epoch:
            self.index.clear()
            self.epoch = epoch

    def live_slots(self) -> list[int]:
        return [slot for slot in range(self.slots) if self.rows[slot] is not None]

    def free_slots(self) -> list[int]:
        """Slots no row holds and no joining row has reserved."""
        return [slot for slot in range(self.slots) if self.rows[slot] is None and slot not in self.reserved]

    def release(self, slot: int, *, keep_prefix: bool = True) -> None:
        """The slot's row is done; its content (the prompt, and the tokens fed back: all but the last, which
        ended the row) stays for prefix reuse unless keep_prefix is False."""
        row = self.rows[slot]
        self.rows[slot] = None
        self.live_count -= 1
        self._live[slot], self._pos[slot] = 0, 0
        self._dirty = True
        if keep_prefix and row is not None:
            self.index.extend(slot, row.tokens[:-1])
        else:
            self.index.forget(slot)

    def _bucket_rows(self, count: int) -> int:
        buckets = self.config.row_buckets
        if not buckets:
            return count
        return min(next((b for b in buckets if b >= count), self.slots), self.slots)

    def _rows_bound(self) -> int:
        """Slots a step covers: the highest live slot + 1, rounded up to a bucket."""
        highest = max(slot for slot in range(self.slots) if self.rows[slot] is not None)
        return self._bucket_rows(highest + 1)

    def _window(self, rows: int) -> int:
        needed = max(self._pos[slot] for slot in range(rows) if self.rows[slot] is not None) + 1
        step = self.config.window_step
        return min(-(-needed // step) * step, self.cache.capacity)

    def _ensure_room(self, *, positions: int = 0, slots: int = 0) -> None:
        """Positions per slot and slots allocated in the cache (growing it replaces its tensor: graphs go)."""
        if self.cache.grow(positions=positions, slots=slots):
            self.graphs.clear()
            self._prefill_inputs.clear()
            self.key_positions = torch.arange(self.cache.capacity, device=self.device)

    def _upload(self) -> None:
        if not self._dirty:
            return
        ints = torch.tensor([self._pos, self._live, self._seed], dtype=torch.long)
        floats = torch.tensor([self._temperature, self._top_p], dtype=torch.float32)
        self._ints.copy_(to_device(ints, self.device))
        self._floats.copy_(to_device(floats, self.device))
        live = [row for row in self.rows if row is not None]
        sampled = [row for row in live if row.request.temperature > 0]
        self._mode = (
            bool(sampled),
            any(row.request.top_p < 1.0 for row in sampled),
            max((row.request.logprobs or 0 for row in live), default=0),
            any(row.request.logprobs is not None for row in live),
        )
        self._dirty = False

    # ----- joining: slots and prefill -----
    def place(self, rows: list[Row]) -> tuple[list[Row], int]:
        """Give as many of `rows` as fit a slot, prefilling what their prompts need. Returns (rows placed,
        prefill forward passes run)."""
        plan = self.plan(rows)
        if not plan:
            return [], 0
        passes = self.prefill(plan, self.logits)
        return self.join(plan, self.logits), passes

    def plan(self, rows: list[Row]) -> list[_Unit]:
        """The first step of place(): as many of `rows` as fit get a slot, which is reserved (and whose prompt the
        prefix index holds from now on) until join(). Between plan() and join() the lane may decode its live rows
        while another thread runs prefill(): the two touch disjoint slots (decode steps write the KV of rows that
        are not live to the scratch slot, and their logits only to self.logits)."""
        free = self.free_slots()
        units: dict[tuple[int, ...], _Unit] = {}
        for row in rows[: len(free)]:
            key = tuple(row.request.prompt_ids)
            unit = units.get(key)
            if unit is None:
                prompt = list(row.request.prompt_ids)
                unit = units[key] = _Unit(prompt, [], block_hashes(prompt))
            unit.rows.append(row)
        if not units:
            return []
        plan = list(units.values())
        self._ensure_room(
            positions=max(len(unit.prompt) + row.request.max_tokens for unit in plan for row in unit.rows)
        )
        self._find_prefixes(plan)
        self._allocate(plan, free)
        # Every slot a step may cover, up to the bucket of the highest slot in use, has memory.
        highest = max(row.slot for unit in plan for row in unit.rows)
        self._ensure_room(slots=self._bucket_rows(max(highest, *self.live_slots(), 0) + 1))
        for unit in plan:
            self.reserved.update(row.slot for row in unit.rows)
            if unit.source is not None:
                self.reserved.add(unit.source)
            self.index.assign(unit.slot, unit.prompt)
        return plan

    def staged_logits(self) -> torch.Tensor:
        """A buffer shaped as self.logits for a prefill that runs beside decode steps (which write self.logits)."""
        if self._staged_logits is None:
            self._staged_logits = torch.zeros_like(self.logits)
        return self._staged_logits

    def join(self, plan: list[_Unit], logits: torch.Tensor) -> list[Row]:
        """The last step of place(): the planned rows, prefilled into `logits`, take their slots (they are live
        from the next step)."""
        placed = []
        for unit in plan:
            first = unit.rows[0]
            others = [row.slot for row in unit.rows[1:]]
            self.cache.copy(first.slot, others, len(unit.prompt))
            targets = others if logits is self.logits else [first.slot, *others]
            if targets:
                index = to_device(torch.tensor(targets), self.device)
                self.logits.index_copy_(0, index, logits[first.slot].clone().expand(len(targets), -1))
            self.prefill_tokens += len(unit.prompt) - unit.reuse
            self.reused_tokens += unit.reuse + len(unit.prompt) * len(others)
            if unit.source is not None:
                self.reserved.discard(unit.source)
            for row in unit.rows:
                self.reserved.discard(row.slot)
                self._occupy(row, len(unit.prompt))
                if row is not first:
                    self.index.assign(row.slot, unit.prompt)
                placed.append(row)
        return placed

    def _find_prefixes(self, plan: list[_Unit]) -> None:
        """Per unit: the longest prefix to reuse, from a slot's content or from a unit joining before it."""
        planned: dict[int, _Unit] = {}  # block hash -> the first unit of this admission holding that prefix
        for unit in plan:
            limit = len(unit.prompt) - 1  # the last prompt token is always computed: its logits start the row
            unit.source, unit.reuse = self.index.longest(unit.prompt, unit.hashes, limit)
            blocks = 0
            while blocks < len(unit.hashes) and unit.hashes[blocks] in planned:
                blocks += 1
            shared = min(blocks * BLOCK, limit)
            if shared > unit.reuse:
                unit.after = planned[unit.hashes[blocks - 1]]
                unit.source, unit.reuse, unit.wave = None, shared, unit.after.wave + 1
            for key in unit.hashes:
                planned.setdefault(key, unit)

    def _allocate(self, plan: list[_Unit], free: list[int]) -> None:
        """Slots for every row: a unit whose prefix sits in a free slot takes that slot as it is (no copy); the
        others take the lowest free slots, which keeps the live slots packed low (fewer rows per step)."""
        claimed: set[int] = set()
        for unit in plan:
            if (
                unit.source is not None
                and self.rows[unit.source] is None
                and unit.source not in self.reserved
                and unit.source not in claimed
            ):
                unit.slot = unit.source
                claimed.add(unit.source)
        spare = iter([slot for slot in free if slot not in claimed])
        for unit in plan:
            if unit.slot < 0:
                unit.slot = next(spare)
            unit.rows[0].slot = unit.slot
            for row in unit.rows[1:]:
                row.slot = next(spare)

    def prefill(self, plan: list[_Unit], logits: torch.Tensor) -> int:
        """The middle step of place(): the planned units' prefill forwards, each unit's next-token logits left in
        its slot's row of `logits`. Returns the forward passes run."""
        # Every copy out of an existing slot first: a slot that is a source may also be a new row's slot.
        for unit in plan:
            if unit.source is not None:
                self.cache.copy(unit.source, [unit.slot], unit.reuse)
        passes = 0
        for wave in range(max(unit.wave for unit in plan) + 1):
            units = [unit for unit in plan if unit.wave == wave]
            for unit in units:
                if unit.after is not None:
                    self.cache.copy(unit.after.slot, [unit.slot], unit.reuse)
            units.sort(key=lambda unit: len(unit.prompt) - unit.reuse)
            chunk: list[_Unit] = []
            for unit in units:
                width = max([len(u.prompt) - u.reuse for u in chunk] + [len(unit.prompt) - unit.reuse])
                if chunk and width * (len(chunk) + 1) > self.config.max_prefill_tokens:
                    self._prefill(chunk, logits)
                    passes += 1
                    chunk = []
                chunk.append(unit)
            if chunk:
                self._prefill(chunk, logits)
                passes += 1
        return passes

    def _prefill(self, units: list[_Unit], logits: torch.Tensor) -> None:
        """One forward over the units' prompt suffixes, writing their KV into their slots after the reused
        prefix, and leaving each unit's next-token logits in its slot's row of `logits` (self.logits, or a staged
        copy for a prefill beside decode steps, which runs eagerly).

        The suffixes run packed, end to end as one sequence of T tokens: the projections and MLPs compute only
        real tokens, however unequal the prompts. Attention alone needs them apart: it sees a (units, width,
        window) layout, each suffix in a row of its own, padded to the longest (attention.PackedLayout maps one
        layout to the other). Where no unit reuses a cached prefix (distinct prompts), each row attends over its
        own new keys (window = width) and the cache is only written. Where a varlen attention serves (CUDA), no
        layout is needed: attention runs on the sequence itself, over the new keys or over each row's keys
        gathered from its slot (_key_inputs). With config.pack_prefill off, every suffix is padded to `width` in
        the sequence as well (the layout before packing, kept for side-by-side benchmarks).

        With prefill buckets (CUDA) the shapes are bucketed, (units, width, window) and T: padding units write
        to the scratch slot and the scratch row of self.logits, padding tokens to the scratch slot. A bucket seen
        before is run as a CUDA graph over input buffers of its own; the first time it runs eagerly, so shapes
        that come once cost no capture."""
        suffixes = [unit.prompt[unit.reuse :] for unit in units]
        count, width = len(units), max(len(s) for s in suffixes)
        window = max(unit.reuse + len(suffix) for unit, suffix in zip(units, suffixes, strict=True))
        if self.config.prefill_buckets:
            count, width = 1 << (count - 1).bit_length(), _round_up(width, 32 if width <= 256 else 128)
            window = min(_round_up(window, self.config.window_step), self.cache.capacity)
        own_keys = all(unit.reuse == 0 for unit in units)
        if own_keys:
            window = width
        # flash varlen attention where it serves: over the new keys, or (packed) over keys gathered from the cache
        varlen = (
            self.config.varlen_prefill
            and self.varlen_attention is not None
            and (own_keys or self.config.pack_prefill)
        )
        if self.config.pack_prefill:
            starts = [0, *itertools.accumulate(map(len, suffixes))]
            tokens = starts.pop()
        else:
            starts, tokens = [p * width for p in range(len(units))], count * width
        if self.config.prefill_buckets:
            tokens = _bucket_tokens(tokens)
        # The inputs on the host as lists, sent as one int64 tensor in one copy (split into views there):
        # (ids, positions, write_slot, index) per token, (slots, last, lengths, offsets) per unit.
        scratch = self.cache.scratch
        ids, positions = [0] * tokens, [0] * tokens
        write_slot = [scratch] * tokens
        index = [count * width] * tokens  # each token's place in attention's layout; padding: past its end
        slots, last, lengths = [scratch] * count, [0] * count, [0] * count
        offsets = [0] * count  # each row's first position (its reused prefix's length)
        for p, (unit, suffix, start) in enumerate(zip(units, suffixes, starts, strict=True)):
            end = start + len(suffix)
            ids[start:end] = suffix
            positions[start:end] = range(unit.reuse, unit.reuse + len(suffix))
            write_slot[start:end] = [unit.slot] * len(suffix)
            index[start:end] = range(p * width, p * width + len(suffix))
            slots[p], last[p], lengths[p], offsets[p] = unit.slot, end - 1, len(suffix), unit.reuse
        inputs = [ids, positions, write_slot, index, slots, last, lengths, offsets]
        key_tokens = 0
        longest = 0  # with varlen: the longest query sequence, which sizes the attention kernel's grid
        if varlen:  # each prompt a sequence, then empty ones for padding units, then the padding tokens
            real_end = starts[len(units) - 1] + len(suffixes[-1])
            inputs.append(_bounds(starts[: len(units)], real_end, count, tokens))
            if not own_keys:
                key_tokens = self._key_inputs(units, tokens - real_end, count, inputs)
            longest = max(width, tokens - real_end)
            if self.config.prefill_buckets:
                # A graph replays its grid for every prefill of its key, so the bound must hold for all of them:
                # no suffix is longer than `width`, nor the padding tokens' sequence than the token bucket's
                # step. A power of two, so that few graphs differ in it alone.
                longest = min(1 << (max(width, _token_step(tokens)) - 1).bit_length(), tokens)
        shape = (count, width, window, own_keys, varlen, longest)
        # On the varlen path neither `width` nor `window` shapes a tensor: graphs differ in the rest only.
        key = ("prefill", *((count, own_keys, longest) if varlen else shape), tokens, key_tokens)
        sizes = [len(part) for part in inputs]
        # through an int64 array: twice as fast as torch.tensor over a list
        host = torch.frombuffer(array.array("q", itertools.chain.from_iterable(inputs)), dtype=torch.long)
        if not self.graphs.enabled or key not in self._prefills_seen or logits is not self.logits:
            self._prefills_seen.add(key)
            self._prefill_tensors(list(to_device(host, self.device).split(sizes)), *shape, logits=logits)
            return
        buffer = self._prefill_inputs.get(key)
        if buffer is None:
            buffer = self._prefill_inputs[key] = torch.empty_like(host, device=self.device)
        buffer.copy_(to_device(host, self.device))
        views = list(buffer.split(sizes))  # the same storage every replay: what the graph captured
        self.graphs.run(key, lambda: self._prefill_tensors(views, *shape))

    def _key_inputs(self, units: list[_Unit], tail: int, count: int, inputs: list[list[int]]) -> int:
        """For a varlen prefill of rows that reuse cached prefixes: the keys each row attends over, its slot at
        positions [0, prefix + suffix), as one gathered sequence (appended to inputs: its boundaries, then the
        slot and the position of every key). The padding tokens' sequence gets at least as many keys (the
        scratch slot's first) as it has tokens, so none of its queries is left without one. Returns the number
        of keys (bucketed on CUDA)."""
        lengths = [len(unit.prompt) for unit in units]
        starts = [0, *itertools.accumulate(lengths)]
        real = starts.pop()
        keys = real + tail
        if self.config.prefill_buckets:
            keys = _bucket_tokens(keys)
        key_slots, key_positions = [self.cache.scratch] * keys, [0] * keys
        for unit, start, length in zip(units, starts, lengths, strict=True):
            key_slots[start : start + length] = [unit.slot] * length
            key_positions[start : start + length] = range(length)
        inputs += [_bounds(starts, real, count, keys), key_slots, key_positions]
        return keys

    def _prefill_tensors(
        self,
        inputs: list[torch.Tensor],
        count: int,
        width: int,
        window: int,
        own_keys: bool,
        varlen: bool,
        longest: int,
        logits: torch.Tensor | None = None,
    ):
        """The prefill forward as a function of tensors only (what a graph of it captures): inputs are 1-D int64
        views of one buffer, (ids, positions, write_slot, index, slots, last, lengths, offsets[, sequences[,
        key_sequences, key_slots, key_positions]]) as _prefill builds them,
        for attention's layout of `count` rows of `width` queries over `window` keys, or with `varlen` on the
        sequence as it is, none of its sequences longer than `longest` (attention.PackedLayout)."""
        ids, positions, write_slot, index, slots, last, lengths, offsets = inputs[:8]
        ids, positions = ids.view(1, -1), positions.view(1, -1)
        if varlen:
            # the boundaries in int32, as the kernel takes them; then (gathered keys) their slots and places
            sequences, *keys = inputs[8:]
            if keys:
                keys[0] = keys[0].int()
            layout = PackedLayout(
                index, count, width, own_keys, sequences.int(), self.varlen_attention, longest, *keys
            )
            mask = self._no_mask
        else:
            # The attention layout's positions: row p holds its suffix at offsets[p] + [0, lengths[p]).
            columns = torch.arange(width, device=ids.device)
            key_positions = columns if own_keys else self.key_positions[:window]
            valid = columns.unsqueeze(0) < lengths.unsqueeze(1)
            row_positions = offsets.unsqueeze(1) + columns.unsqueeze(0)
            sees = (key_positions <= row_positions.unsqueeze(2)) & valid.unsqueeze(2)
            sees |= ~valid.unsqueeze(2) & (
                key_positions == 0
            )  # a padding query sees one key: no all-masked row
            # repeated here for the query heads sharing a KV head (attention._attend), not again in every layer
            mask = additive(sees.unsqueeze(1), self.cache.kv.dtype).repeat(1, 1, self.query_group, 1)
            layout = PackedLayout(index, count, width, own_keys)
        state = SlotAttention(
            self.cache, write_slot, positions[0], None if own_keys else slots, window, layout
        )
        hidden = self.decoder(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=False,
            slot_kv=state,
        ).last_hidden_state
        target = self.logits if logits is None else logits
        target.index_copy_(0, slots, self.lm_head(hidden[0, last]).float())

    def _occupy(self, row: Row, prompt_length: int) -> None:
        slot = row.slot
        self.rows[slot] = row
        self.live_count += 1
        request = row.request
        self._pos[slot], self._live[slot], self._seed[slot] = prompt_length, 1, row.seed
        self._temperature[slot], self._top_p[slot] = float(request.temperature), float(request.top_p)
        self._dirty = True

    # ----- a decode step -----
    def sample(self) -> None:
        """Choose the next token of every live row from self.logits, and start copying the choices to the host
        (read() waits for them). Rows that left since the last step are first packed into the lowest slots."""
        self._compact()
        self._upload()
        rows = self._rows_bound()
        sampled, nucleus, top_k, want_logprobs = self._mode
        self.graphs.run(
            ("sample", rows, sampled, nucleus, top_k, want_logprobs),
            lambda: self._sample(rows, sampled, nucleus, top_k, want_logprobs),
        )
        # Copies, not views: in the overlapped order the next step may run before the host reads these.
        outputs = [self.tokens[:rows]]
        if want_logprobs:
            outputs.append(self.picked[:rows])
        if top_k:
            outputs += [self.top_values[:rows, :top_k], self.top_ids[:rows, :top_k]]
        if self.device.type == "cuda":
            self._sampled = [t.to("cpu", non_blocking=True) for t in outputs]
            self._sampled_ready = torch.cuda.Event()
            self._sampled_ready.record()
        else:
            self._sampled = [t.clone() for t in outputs]

    def note_launch(self) -> None:
        """Called before the host launches a loop iteration's device work: counts the launch as idle when the
        device has already finished the last decode step (nothing queued kept it busy meanwhile)."""
        if self._stepped is not None:
            self.idle_launches += self._stepped.query()
            self._stepped = None

    def _sample(self, rows: int, sampled: bool, nucleus: bool, top_k: int, logprobs: bool) -> None:
        tokens, picked, top_values, top_ids = choose(
            self.logits[:rows],
            self.temperature[:rows],
            self.top_p[:rows],
            self.seed[:rows],
            self.pos[:rows],
            sampled=sampled,
            nucleus=nucleus,
            top_k=top_k,
            logprobs=logprobs,
        )
        self.tokens[:rows].copy_(tokens)
        if picked is not None:
            self.picked[:rows].copy_(picked)
        if top_values is not None and top_ids is not None:
            self.top_values[:rows, :top_k].copy_(top_values)
            self.top_ids[:rows, :top_k].copy_(top_ids)

    def read(self) -> tuple[list[int], list[float], list[list[float]], list[list[int]]]:
        """What the last sample() chose, per slot: the token, and (empty lists when no live row asked) its
        log-prob and the top alternatives' log-probs and ids."""
        if self._sampled_ready is not None:
            started = time.perf_counter()
            self._sampled_ready.synchronize()  # the copies only, not whatever was queued after them
            self.read_wait_seconds += time.perf_counter() - started
            self._sampled_ready = None
        _, _, top_k, want_logprobs = self._mode
        outputs = iter(self._sampled)
        tokens = next(outputs).tolist()
        picked = next(outputs).tolist() if want_logprobs else []
        if not top_k:
            return tokens, picked, [], []
        return tokens, picked, next(outputs).tolist(), next(outputs).tolist()

    def live_rows(self) -> list[tuple[int, Row]]:
        return [(slot, row) for slot, row in enumerate(self.rows) if row is not None]

    def step(self) -> None:
        """One decode forward of every live row: its sampled token in, the next logits out."""
        self._upload()
        rows = self._rows_bound()
        window = self._window(rows)
        self.graphs.run(("decode", rows, window), lambda: self._decode(rows, window))
        self.pos.add_(self.live)
        if self.device.type == "cuda":
            self._stepped = torch.cuda.Event()
            self._stepped.record()
        for slot in range(rows):
            if self.rows[slot] is not None:
                self._pos[slot] += 1

    def _decode(self, rows: int, window: int) -> None:
        self._decode_step(
            self.tokens[:rows],
            self.pos[:rows],
            self.live[:rows],
            self.slot_ids[:rows],
            self.key_positions[:window],
            self.logits[:rows],
        )

    def _decode_tensors(self, tokens, pos, live, slot_ids, key_positions, logits) -> None:
        """The decode forward as a function of tensors only (rows and window are their sizes), so a compiled
        version traces it once for all shapes."""
        rows, window = tokens.shape[0], key_positions.shape[0]
        scratch = self.cache.kv.shape[2] - 1  # from the shape: a compiled step stays valid as slots grow
        write_slot = torch.where(live > 0, slot_ids, scratch)
        sees = (key_positions <= pos.unsqueeze(1)).view(rows, 1, 1, window)
        state = SlotAttention(self.cache, write_slot, pos, None, window)
        hidden = self.decoder(
            input_ids=tokens.unsqueeze(1),
            position_ids=pos.unsqueeze(1),
            attention_mask=additive(sees, self.cache.kv.dtype),
            use_cache=False,
            slot_kv=state,
        ).last_hidden_state
        logits.copy_(self.lm_head(hidden[:, -1]))

    def _compact(self) -> None:
        """Move the highest live rows into free slots below them until the step covers as few slots as the live
        rows need (rows leave in any order; a step covers slots [0, rows))."""
        live = self.live_slots()
        if not live:
            return
        target = self._bucket_rows(len(live))
        holes = [slot for slot in range(target) if self.rows[slot] is None and slot not in self.reserved]
        while live and holes and live[-1] >= target:
            self._move(live.pop(), holes.pop(0))

    def _move(self, source: int, target: int) -> None:
        row = self.rows[source]
        if row is None:
            raise ValueError(f"slot {source} holds no row to move")
        length = self._pos[source]  # positions holding KV
        self.cache.copy(source, [target], length)
        self.logits[target] = self.logits[source]  # moved between steps: the row's next logits go with it
        self.index.move(source, target)
        for ints in (self._pos, self._live, self._seed):
            ints[target] = ints[source]
        for floats in (self._temperature, self._top_p):
            floats[target] = floats[source]
        self._live[source], self._pos[source] = 0, 0
        self.rows[target], self.rows[source] = row, None
        row.slot = target
        self._dirty = True


def additive(sees: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask as SDPA's additive one: 0 where a query sees a key, -inf where not. Made once per forward;
    given the boolean mask, SDPA would convert it again in every layer (one kernel more per layer)."""
    return torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill_(~sees, float("-inf"))


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _token_step(tokens: int) -> int:
    """The bucket step of a packed prefill of `tokens` tokens: four buckets an octave, none under 64."""
    return 1 << max(6, tokens.bit_length() - 3)


def _bucket_tokens(tokens: int) -> int:
    """Tokens rounded up to their bucket (at most a quarter padding): few shapes, so most prefills replay a
    graph."""
    return _round_up(tokens, _token_step(tokens))


def _bounds(starts: list[int], end: int, count: int, total: int) -> list[int]:
    """A varlen sequence's count + 2 boundaries: its real spans (starting at `starts`, the last ending at `end`),
    empty spans for the padding units up to `count`, and the padding tokens' span to `total`."""
    return [*starts, *[end] * (count - len(starts) + 1), total]
