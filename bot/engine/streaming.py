"""Stream weights that do not fit the budget, overlapping the copies with compute.

Layers are recorded in the order they first run. From then on, when layer i runs, the weights of
layers i+1..i+depth are already being copied host->GPU on a side CUDA stream (from pinned memory),
so the copy engine works while the SMs compute. On the CPU the same code runs without streams
(it is what the tests exercise).
"""

from __future__ import annotations

import torch


class Streamer:
    def __init__(self, device: torch.device, *, depth: int = 3, wrap: bool = True):
        self.device = device
        self.depth = depth
        self.wrap = wrap  # also prefetch the first layers once the last one ran (next denoising step)
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.order: list = []
        self.position: dict[int, int] = {}
        self.recording = True
        self.pending: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.copied_bytes = 0

    def _copy(self, layer) -> tuple[list[torch.Tensor], object]:
        sources = layer._stream_sources
        self.copied_bytes += sum(t.numel() * t.element_size() for t in sources)
        if not self.cuda:
            return [t.to(self.device) for t in sources], None
        with torch.cuda.stream(self.copy_stream):
            out = [t.to(self.device, non_blocking=True) for t in sources]
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return out, event

    def fetch(self, layer) -> list[torch.Tensor]:
        """The layer's tensors on the device, ready to use on the current stream."""
        key = id(layer)
        if self.recording:
            if key in self.position:
                self.recording = False  # one full pass seen: the order is known
            else:
                self.position[key] = len(self.order)
                self.order.append(layer)
        tensors, event = self.pending.pop(key, None) or self._copy(layer)
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors:
                t.record_stream(current)  # allocated on the copy stream, used here
        if not self.recording:
            self._prefetch_after(self.position[key])
        return tensors

    def _prefetch_after(self, index: int) -> None:
        n = len(self.order)
        for step in range(1, self.depth + 1):
            j = index + step
            if j >= n:
                if not self.wrap:
                    break
                j %= n
            nxt = self.order[j]
            if id(nxt) not in self.pending:
                self.pending[id(nxt)] = self._copy(nxt)

    def flush(self) -> None:
        """Drop prefetched copies (end of a job: their memory goes back to the budget)."""
        self.pending.clear()
