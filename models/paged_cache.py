"""A span's whole KV budget as a pool of fixed-size pages, shared by its sessions (vLLM-style paging).

`PagePool` owns one key and one value tensor `[layer, kv_head, slot, head_dim]`, where slot =
page * page_size + offset. A session's cache is a `PagedSequence`: the pages it holds, in order.
Pages are handed out on demand, so a server admits sessions by the tokens they actually use, not
by the max length each asked for.

Layout and allocator are chosen so a lone session pays nothing for paging: a growing sequence is
given the page right after its last one when it is free; otherwise (and for a new sequence) a page
in the largest free run, placed to leave room to grow both to it and to the sequence before the
run. A sequence whose pages are consecutive reads its keys as a zero-copy slice, with the same
strides as `KVCache`; others are gathered page by page with `index_select`.

`PagedBatch` is one decode step of several sessions (ORCA-style iteration batching): the linear
layers see all B rows at once, and each row attends to its own keys.

A pool and its sequences are not thread-safe: one step at a time, as a span runs anyway.
"""

from __future__ import annotations

import torch

from .errors import CacheFullError, CachePositionError, SessionFullError
from .registry import REWIND_SLACK_PAGES


class PagePool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a pool needs at least one page of at least one token, not {num_pages} x {page_size}")
        shape = (num_layers, num_kv_heads, num_pages * page_size, head_dim)
        # zeros, as KVCache: a gathered page's tail past a sequence's length is cut off, never read
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self._num_pages, self._page_size = num_pages, page_size
        self._free = bytearray(b"\x01") * num_pages  # 1 = free; a bytearray so one flag costs ~50 ns to read
        self._free_count = num_pages
        self._offsets = torch.arange(page_size, device=device)  # slot offsets within a page
        # the same storage by page, [layer, kv_head, page, page_size * head_dim], to gather whole pages
        self._k_pages = self.k.view(num_layers, num_kv_heads, num_pages, page_size * head_dim)
        self._v_pages = self.v.view(num_layers, num_kv_heads, num_pages, page_size * head_dim)
        self._gathered = self.k.new_empty((2, num_kv_heads, 0, page_size * head_dim))  # gather's output, grown

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def free_pages(self) -> int:
        return self._free_count

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def bytes_per_page(self) -> int:
        return self.nbytes // self._num_pages

    def gather(self, layer: int, pages: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `pages`, in order, cut to `length` tokens: [1, kv_heads, length, D] each.

        Views of one buffer the next gather overwrites: read them before gathering again."""
        h, n = self.num_kv_heads, pages.numel()
        if self._gathered.shape[2] < n:  # reused from layer to layer and step to step: no fresh pages to fault in
            self._gathered = self.k.new_empty((2, h, max(n, 2 * self._gathered.shape[2]), self._k_pages.shape[3]))
        keys, values = self._gathered[0, :, :n], self._gathered[1, :, :n]
        torch.index_select(self._k_pages[layer], 1, pages, out=keys)
        torch.index_select(self._v_pages[layer], 1, pages, out=values)
        d = self.head_dim
        return keys.view(1, h, -1, d)[:, :, :length], values.view(1, h, -1, d)[:, :, :length]

    def sequence(self, max_length: int | None = None) -> PagedSequence:
        """A new, empty session cache; `max_length` caps it as `KVCache`'s size does."""
        return PagedSequence(self, max_length)

    def batch(self, seqs: list[PagedSequence], positions: list[int]) -> PagedBatch:
        """One decode step (one new token each) of `seqs` at `positions` (each has reserved its room)."""
        return PagedBatch(self, seqs, positions)

    def _take(self, after: int | None, wanted: int) -> int:
        """One free page: `after + 1` when free, so sequences stay contiguous; else the start of a
        fresh stretch with room for the `wanted` pages the sequence is about to take."""
        if after is not None and after + 1 < self._num_pages and self._free[after + 1]:
            page = after + 1
        else:
            page = self._fresh_page(wanted)
        self._free[page] = 0
        self._free_count -= 1
        return page

    def _fresh_page(self, wanted: int) -> int:
        """A page in the largest free run: its start when nothing precedes it, else where the room
        left beyond `wanted` pages is split evenly between the new sequence and whatever sequence
        grows into the run from the left."""
        free = torch.frombuffer(self._free, dtype=torch.uint8).to(torch.int8)
        edges = torch.diff(free, prepend=free.new_zeros(1), append=free.new_zeros(1))
        starts = torch.nonzero(edges == 1).flatten()
        lengths = torch.nonzero(edges == -1).flatten() - starts
        best = int(torch.argmax(lengths))
        start, length = int(starts[best]), int(lengths[best])
        return start if start == 0 else start + max(0, length - wanted) // 2

    def _give_back(self, pages: list[int]) -> None:
        for p in pages:
            self._free[p] = 1
        self._free_count += len(pages)


class PagedSequence:
    """One session's cache in a pool: `pages` in order, and `length` positions holding valid keys.

    Same contract as `KVCache`: `reserve(position, n)` before a step (a position below `length`
    rewinds, above it is an error), `write()` per layer, then `length = position + n`."""

    def __init__(self, pool: PagePool, max_length: int | None = None) -> None:
        self.pool = pool
        self.max_length = max_length
        self.length = 0
        self.pages: list[int] = []
        # kept up to date as pages come, so a step only slices them: the pages as a tensor (to gather
        # keys page by page, 4 KB runs rather than one row per token), and the slot of every position
        self._page_ids = torch.empty(0, dtype=torch.long, device=pool.device)
        self._slots = torch.empty(0, dtype=torch.long, device=pool.device)
        self._base: int | None = None  # first slot when the pages are consecutive: keys are then a slice

    @property
    def capacity(self) -> int:
        """Positions the held pages cover."""
        return len(self.pages) * self.pool.page_size

    @property
    def contiguous(self) -> bool:
        return self._base is not None

    def reserve(self, position: int, new_tokens: int) -> None:
        """Make room for `new_tokens` at `position`, taking every page needed or none.

        A rewind (position below `length`: a replay, a re-sent turn, drafts refused in speculative
        decoding) gives back the pages past the new end, but for `REWIND_SLACK_PAGES`: a client that
        rewinds a little (rejected drafts) grows back into them on its next step."""
        if not 0 <= position <= self.length:
            raise CachePositionError(f"step at position {position}, but the cache holds {self.length} tokens")
        end = position + new_tokens
        if self.max_length is not None and end > self.max_length:
            raise SessionFullError(
                f"session is full: {position} + {new_tokens} tokens exceeds its max length {self.max_length}; "
                "start a new session with a larger --max-length"
            )
        ps = self.pool.page_size
        need = -(-end // ps) - len(self.pages)
        if position < self.length:
            self.length = position  # what lies past it is stale from now on, whatever happens below
            if need < -REWIND_SLACK_PAGES:
                self.truncate(-(-end // ps) + REWIND_SLACK_PAGES)
        if need <= 0:
            return
        if need > self.pool.free_pages:
            raise CacheFullError(
                f"server's KV cache is full: {new_tokens} tokens at position {position} need {need} more pages "
                f"of {ps} tokens, {self.pool.free_pages} of {self.pool.num_pages} are free; "
                "try another server or a shorter session"
            )
        self._grow(len(self.pages) + need)
        for taken in range(need):
            last = self.pages[-1] if self.pages else None
            page = self.pool._take(last, need - taken)
            n = len(self.pages)
            self._page_ids[n] = page
            self._slots[n * ps : (n + 1) * ps] = self.pool._offsets + page * ps
            self.pages.append(page)
            if n == 0:
                self._base = page * ps
            elif page != last + 1:
                self._base = None

    def truncate(self, pages: int) -> None:
        """Keep the first `pages` pages (and at most `length` tokens); give the rest back to the pool."""
        if pages >= len(self.pages):
            return
        self.pool._give_back(self.pages[pages:])
        del self.pages[pages:]
        self.length = min(self.length, pages * self.pool.page_size)
        # a prefix of consecutive pages stays consecutive; a cut may also make the rest consecutive
        if not self.pages:
            self._base = None
        elif self._base is None and all(b == a + 1 for a, b in zip(self.pages, self.pages[1:], strict=False)):
            self._base = self.pages[0] * self.pool.page_size

    def release(self) -> None:
        """Give every page back to the pool; the sequence is empty (and usable) afterwards."""
        self.pool._give_back(self.pages)
        self.pages = []
        self.length = 0
        self._base = None

    def write(self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k, v` [1, kv_heads, T, D] at `position`; return all valid keys and values [1, kv_heads, S, D]."""
        end = position + k.shape[2]
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        base = self._base
        if base is not None:
            pk[:, base + position : base + end] = k[0]
            pv[:, base + position : base + end] = v[0]
            return pk[None, :, base : base + end], pv[None, :, base : base + end]
        slots = self._slots[position:end]
        pk.index_copy_(1, slots, k[0])
        pv.index_copy_(1, slots, v[0])
        pages = self._page_ids[: -(-end // self.pool.page_size)]
        return self.pool.gather(layer, pages, end)

    def _grow(self, pages: int) -> None:
        if self._page_ids.numel() >= pages:
            return
        pages = max(pages, 2 * self._page_ids.numel())
        page_ids = torch.empty(pages, dtype=torch.long, device=self.pool.device)
        page_ids[: self._page_ids.numel()] = self._page_ids
        slots = torch.empty(pages * self.pool.page_size, dtype=torch.long, device=self.pool.device)
        slots[: self._slots.numel()] = self._slots
        self._page_ids, self._slots = page_ids, slots


class PagedBatch:
    """One decode step of B sessions, one new token each, at their own positions.

    Built once per step, read by every layer: `write(layer, _, k, v)` stores each row's new key and
    value at its own slot and returns each row's keys and values, a list of `[1, kv_heads, S_i, D]`
    (zero-copy views for contiguous sequences). Attention then runs once per row: measured on CPU,
    that beats gathering every row into one padded tensor for a single SDPA call, because the
    gather moves all the keys twice where the per-row calls read them once in place. Every session
    has reserved its room for this step before (`seq.reserve(position, 1)`)."""

    def __init__(self, pool: PagePool, seqs: list[PagedSequence], positions: list[int]) -> None:
        if len(seqs) != len(positions):
            raise ValueError(f"{len(seqs)} sequences but {len(positions)} positions")
        if len({id(s) for s in seqs}) != len(seqs):
            raise ValueError("a sequence appears twice in one batch")
        if any(seq.pool is not pool for seq in seqs):
            raise ValueError("every sequence of a batch must come from the same pool")
        self.pool, self.seqs, self.positions = pool, seqs, positions
        ps = pool.page_size
        new_slots = [s.pages[p // ps] * ps + p % ps for s, p in zip(seqs, positions, strict=True)]
        self.new_slots = torch.tensor(new_slots, dtype=torch.long, device=pool.device)
        self.position_ids = torch.tensor(positions, dtype=torch.long, device=pool.device)
        self.keys = max(positions) + 1  # keys the longest row sees
        # made once per step for every layer: a contiguous row's keys and values as views
        # [layer, 1, kv_heads, S_i, D] of the pool; the other rows' pages, gathered in one call per layer
        k5, v5 = pool.k[:, None], pool.v[:, None]
        self._views: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self._gathered: list[tuple[int, int, int]] = []  # row, first token in the gathered pages, length
        gather_pages: list[torch.Tensor] = []
        offset = 0
        for i, (s, p) in enumerate(zip(seqs, positions, strict=True)):
            if s._base is not None:
                end = s._base + p + 1
                self._views.append((k5[:, :, :, s._base : end], v5[:, :, :, s._base : end]))
            else:
                self._views.append(None)
                n_pages = p // ps + 1
                gather_pages.append(s._page_ids[:n_pages])
                self._gathered.append((i, offset, p + 1))
                offset += n_pages * ps
        self._gather_pages = torch.cat(gather_pages) if gather_pages else None
        self._gather_tokens = offset

    def write(
        self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Store `k, v` [B, kv_heads, 1, D] (`position` is unused: each row has its own); return
        each row's keys and values [1, kv_heads, S_i, D]."""
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        pk.index_copy_(1, self.new_slots, k[:, :, 0].transpose(0, 1))
        pv.index_copy_(1, self.new_slots, v[:, :, 0].transpose(0, 1))
        if self._gather_pages is None:
            return [kv[0][layer] for kv in self._views], [kv[1][layer] for kv in self._views]
        keys = [None if kv is None else kv[0][layer] for kv in self._views]
        values = [None if kv is None else kv[1][layer] for kv in self._views]
        gk, gv = self.pool.gather(layer, self._gather_pages, self._gather_tokens)
        for i, start, n in self._gathered:
            keys[i], values[i] = gk[:, :, start : start + n], gv[:, :, start : start + n]
        return keys, values

    def commit(self) -> None:
        """After the step: every session holds one more token."""
        for seq, position in zip(self.seqs, self.positions, strict=True):
            seq.length = position + 1
