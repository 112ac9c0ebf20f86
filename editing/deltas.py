"""An edit's exact deltas, by parameter name: what :class:`editing.session.EditSession` adds and refolds."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch


class Deltas(Mapping):
    """Parameter name → the exact delta an edit added, without keeping rank-one deltas in memory.

    A rank-one ΔW = B·A has one rounded product per entry (no sums), so recomputing it
    gives the same bits every time; it is rebuilt when read (an undo's refold) instead of
    stored (a full matrix per edit: 3.5 MB on the demo model, 180 MB on a 7B model).
    Deltas of rank > 1 (MEMIT, batches) are kept, since a sum's rounding may depend on the
    BLAS path.
    """

    def __init__(self, stored: dict[str, torch.Tensor], rank_one: dict[str, Callable[[], torch.Tensor]]):
        self._stored, self._rank_one = stored, rank_one

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._stored[name] if name in self._stored else self._rank_one[name]()

    def __iter__(self) -> Iterator[str]:
        yield from self._stored
        yield from self._rank_one

    def __len__(self) -> int:
        return len(self._stored) + len(self._rank_one)


def delta_of(spec, B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ΔW = B·A in the stored layout (the architecture map transposes GPT-2's Conv1D) and dtype."""
    return spec.from_out_in(B @ A).to(dtype).contiguous()
