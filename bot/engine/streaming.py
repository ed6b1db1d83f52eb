"""Stream weights that do not fit the budget, overlapping the copies with compute.

Layers are recorded in the order they first run. From then on, when a layer runs, the layers after
it are already being copied host->GPU on a side CUDA stream (from pinned memory), up to `window`
bytes ahead, so the copy engine works while the SMs compute. Streamed layers are spread between
resident ones (see `offload.place`), so there is compute to hide every copy behind.

The CPU runs ahead of the GPU; weights it has handed out but the GPU has not used yet also hold
memory. Once those pass `window` bytes, `fetch` waits for the GPU, so the streamed weights on the
card stay under twice the window whatever the CPU does. On the CPU the same code runs without
streams (it is what the tests exercise).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator

import torch

MIB = 1024**2


class Streamer:
    def __init__(self, device: torch.device, *, window: int = 512 * MIB, wrap: bool = True):
        self.device = device
        self.window = window
        self.wrap = wrap  # also prefetch the first layers once the last one ran (next denoising step)
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.order: list = []
        self.position: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.recording = True
        self.pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.pending_bytes = 0
        self.handed_out: deque[tuple[torch.cuda.Event, int]] = deque()  # (event after its use, bytes)
        self.handed_out_bytes = 0
        self.last_fetched = 0
        self.copied_bytes = 0
        self.spin_cycles_per_byte = 0.0  # benchmarks only: see `cap_rate`
        # While `holding`: the layers fetched so far, kept for the next calls (a grid's images)
        self.held: dict[int, list[torch.Tensor]] | None = None
        self.held_bytes = 0

    def cap_like(self, other: Streamer) -> None:
        """The same cap as `other` (measured once there: one link and one clock per device)."""
        self.spin_cycles_per_byte = other.spin_cycles_per_byte

    def cap_rate(self, gb_per_s: float) -> dict[str, float]:
        """Benchmarks only: copy host->GPU at most `gb_per_s` (1e9 bytes/s), as a slower link would
        (a home card's PCIe 4.0 x8 moves about 13 GB/s). After each layer's copies the copy stream
        spins for the time those bytes take at that rate, less what they take on this link (both
        measured here, once): one thread block spinning, so the SMs stay free for the compute.
        Returns what was measured."""
        if not self.cuda:
            raise ValueError("a copy rate can only be capped on a CUDA device")
        probe = torch.empty(256 * MIB, dtype=torch.uint8, pin_memory=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.copy_stream):
            probe.to(self.device, non_blocking=True)  # once untimed: allocation and warm-up
            start.record()
            probe.to(self.device, non_blocking=True)
            end.record()
            end.synchronize()
            link = probe.numel() / (start.elapsed_time(end) / 1e3)
            # The spin counts SM clock cycles: time it once the clock has left its idle speed (a
            # spin measured while it ramps up reads a slow clock, and the cap then lets more through).
            torch.cuda._sleep(200_000_000)
            cycles = 100_000_000
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            clock = cycles / (start.elapsed_time(end) / 1e3)
        spin_s_per_byte = max(0.0, 1.0 / (gb_per_s * 1e9) - 1.0 / link)
        self.spin_cycles_per_byte = clock * spin_s_per_byte
        return {"link_gb_per_s": link / 1e9, "spin_clock_ghz": clock / 1e9, "cap_gb_per_s": gb_per_s}

    def _size(self, layer) -> int:
        key = id(layer)
        if key not in self.sizes:
            self.sizes[key] = sum(t.numel() * t.element_size() for t in layer._stream_sources)
        return self.sizes[key]

    def _copy(self, layer) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        self.copied_bytes += self._size(layer)
        sources = layer._stream_sources
        if not self.cuda:
            return [t.to(self.device) for t in sources], None
        with torch.cuda.stream(self.copy_stream):
            out = [t.to(self.device, non_blocking=True) for t in sources]
            if self.spin_cycles_per_byte:
                torch.cuda._sleep(int(self._size(layer) * self.spin_cycles_per_byte))
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return out, event

    def _throttle(self, current) -> None:
        """Everything enqueued so far used the previously fetched layer: mark that point, and wait
        for the GPU while the CPU holds more than a window of handed-out weights."""
        if self.last_fetched:
            event = torch.cuda.Event()
            event.record(current)
            self.handed_out.append((event, self.last_fetched))
            self.handed_out_bytes += self.last_fetched
        while self.handed_out_bytes > self.window:
            event, size = self.handed_out.popleft()
            event.synchronize()
            self.handed_out_bytes -= size

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Within this, a layer fetched once is held and handed out again to later calls (the same
        block run for each image of a batch): its weights cross the link once for all of them. The
        held bytes count against the window from the end of the block on, as one layer's would
        from its one use: their memory is in use until the last image has passed."""
        self.held, self.held_bytes = {}, 0
        try:
            yield
        finally:
            held_bytes, self.held, self.held_bytes = self.held_bytes, None, 0
            if self.cuda and held_bytes:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                self.handed_out.append((event, held_bytes))
                self.handed_out_bytes += held_bytes

    def fetch(self, layer) -> list[torch.Tensor]:
        """The layer's tensors on the device, ready to use on the current stream."""
        key = id(layer)
        if self.held is not None and key in self.held:
            return self.held[key]  # already waited for, on this stream
        if key not in self.position:  # first use (a layer may first run after the order is known)
            self.position[key] = len(self.order)
            self.order.append(layer)
        elif self.recording:
            self.recording = False  # a layer ran again: the order is known
        hit = self.pending.pop(key, None)
        if hit is not None:
            self.pending_bytes -= self._size(layer)
        tensors, event = hit or self._copy(layer)
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            self._throttle(current)
            current.wait_event(event)
            for t in tensors:
                t.record_stream(current)  # allocated on the copy stream, used here
        self.last_fetched = self._size(layer)
        if self.held is not None:  # counted when the hold ends, not at its first use
            self.held[key] = tensors
            self.held_bytes += self.last_fetched
            self.last_fetched = 0
        if not self.recording:
            self._prefetch_after(self.position[key])
        return tensors

    def _prefetch_after(self, index: int) -> None:
        """Queue copies of the layers after `index` while they fit the window (at least one)."""
        n = len(self.order)
        for step in range(1, n):
            j = index + step
            if j >= n:
                if not self.wrap:
                    break
                j %= n
            nxt = self.order[j]
            if id(nxt) in self.pending:
                continue
            size = self._size(nxt)
            if self.pending and self.pending_bytes + size > self.window:
                break
            self.pending[id(nxt)] = self._copy(nxt)
            self.pending_bytes += size

    def flush(self) -> None:
        """Drop prefetched copies (end of a job: their memory goes back to the budget)."""
        self.pending.clear()
        self.pending_bytes = 0
        self.handed_out.clear()
        self.handed_out_bytes = 0
        self.last_fetched = 0
