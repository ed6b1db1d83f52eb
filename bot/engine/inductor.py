"""How TorchInductor compiles the DiT blocks: settings measured on an H100 (docs/benchmarks.md).

- The tanh GELU as `x * sigmoid(2z)`, the same function (0.5 * (1 + tanh(z)) = sigmoid(2z);
  max difference 5e-7 in fp32). Inductor emits tanh as libdevice's exact tanh, which made the
  kernels that apply GELU and quantize the MLP activations to float8 compute-bound; sigmoid uses
  the fast exp. Those kernels: 231 -> 185 us (single blocks), 151 -> 103 us (double blocks).
- Whole rows in one pass. Quantizing a row to float8 needs its largest value first; the rows are
  3072 wide (norm + modulation), 12288 (the MLP) and 15360 (a single block's attention and MLP
  side by side). Inductor keeps a row in registers ("persistent" reduction) only up to 1024
  elements, and split the 15360 ones across kernels, so each of these kernels read its input twice
  or three times. Persistent up to 16384 and no split reductions: a step's kernels 90.3 -> 84.3 ms.
- Coordinate-descent tuning of the Triton kernels' block sizes: 3 ms less per step, paid for
  once in compile time (the tuned configs are cached on disk with the compiled kernels).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("fluxbot.engine")

_K_BETA = 0.7978845608028654  # sqrt(2 / pi), as in torch's own tanh GELU
PERSISTENT_ROW_LIMIT = 16384
# Part of Inductor's cache key: kernels cached on disk under other settings are not reused.
CACHE_KEY_TAG = "fluxbot-inductor-2"


def gelu_as_sigmoid(a: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """aten.gelu for Inductor: the tanh form through sigmoid, the exact form as torch writes it."""
    if approximate == "tanh":
        inner = _K_BETA * (a + 0.044715 * a * a * a)
        return a * torch.sigmoid(2.0 * inner)
    return a * 0.5 * (1 + torch.erf(a * 0.7071067811865476))


def _persistent_rows_up_to(limit: int) -> None:
    """Let Inductor keep rows of up to `limit` elements in registers for row-wise (inner)
    reductions. Its heuristic lives in InductorChoices; there is no config value for it."""
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.runtime.hints import ReductionHint
        from torch._inductor.virtualized import V
    except ImportError as exc:
        log.info("Inductor's reduction heuristic not found (%s): its own limit stays", exc)
        return
    raw = InductorChoices.__dict__.get("should_use_persistent_reduction")
    if getattr(raw, "_fluxbot_limit", None) == limit:
        return  # already installed
    if not isinstance(raw, staticmethod):
        log.info("Inductor's reduction heuristic has another shape in torch %s: its own limit stays", torch.__version__)
        return
    inductor_default = getattr(raw.__func__, "_fluxbot_default", raw.__func__)

    def should_use_persistent_reduction(features, cooperative_reduction):
        if inductor_default(features, cooperative_reduction):
            return True
        strict_rblock = getattr(features, "strict_sum_rblock", None)
        if strict_rblock is not None and strict_rblock() is not None:
            return False  # a strict-numerics sum with a fixed block: Inductor's "no" is about correctness
        import torch._inductor.config as config

        return (
            config.triton.persistent_reductions
            and not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, limit)
        )

    # Tags the next configure() reads back (see above): installed already, and Inductor's own rule.
    should_use_persistent_reduction.__dict__.update(_fluxbot_limit=limit, _fluxbot_default=inductor_default)
    InductorChoices.should_use_persistent_reduction = staticmethod(should_use_persistent_reduction)


def configure(*, tuning: bool = True) -> None:
    """Apply the settings for this process (they only touch code torch.compile generates).
    `tuning`: coordinate-descent tuning (faster kernels, a longer first compile). Process-wide, like
    the rest: the last Engine loaded decides it for blocks that have not compiled yet (the bot loads one)."""
    import torch._inductor.config as config

    config.coordinate_descent_tuning = tuning
    config.split_reductions = False
    _persistent_rows_up_to(PERSISTENT_ROW_LIMIT)
    try:
        torch.compiler.config.cache_key_tag = CACHE_KEY_TAG
    except AttributeError:  # an older torch: no tag, the cache may hold kernels made otherwise
        pass
    try:
        from torch._inductor import decomposition

        decomposition.decompositions[torch.ops.aten.gelu.default] = gelu_as_sigmoid
        decomposition.fast_random_decomps.cache_clear()  # a cached copy of the table
    except (ImportError, AttributeError) as exc:  # a torch without this table: keep its own GELU
        log.info("Inductor decomposition table not found (%s): GELU compiles as torch writes it", exc)
