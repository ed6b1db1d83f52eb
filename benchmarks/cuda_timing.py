"""GPU time of a call without launch gaps, for the kernel micro-benchmarks."""

import torch


def graph_us(fn, *args, n: int = 20) -> float:
    """Microseconds per call of `fn(*args)`, from a CUDA graph of n calls replayed 5 times (after
    3 warm-up calls on a side stream), so Python's launch overhead is not in the number."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn(*args)
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(5):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / (5 * n) * 1000
