"""TIES sign consensus on hand-computed numbers, and where it deliberately departs from PEFT.

Weightsmith's TIES is mergekit's (merging/methods/task_arithmetic.py): the sign of each
entry is elected from the sum of the *weighted* task vectors, the agreeing weighted
entries are summed, and the sum is divided by the *weights* of the entries kept.
PEFT's ``merge_utils.ties`` elects the sign from the unweighted task vectors and
divides by the *number* of entries kept. The case below is built so that both
differences show: columns 1 and 4 elect a different sign, columns 2 and 5 divide
differently; column 0 agrees; column 3 (all zero) keeps nothing.
"""

from __future__ import annotations

import torch

from merging.methods import get_method
from merging.methods.base import TensorContext

TAU = torch.tensor([  # task vectors θᵢ − θ_base, one row per model, six entries
    [3.0, 1.0, 2.0, 0.0, -1.0, -2.0],
    [-1.0, 1.0, 2.0, 0.0, 4.0, 1.0],
    [-1.0, -2.0, 1.0, 0.0, 0.0, 1.0],
])
WEIGHTS = [1.0, 0.5, 2.0]
BASE = torch.tensor([0.5, -1.0, 2.0, 3.0, 0.0, 1.0])

# By hand, column by column (w = 1, 0.5, 2):
#   0: weighted 3, -0.5, -2     sum  0.5 -> +  keep model 1:       3 / 1          = 3
#   1: weighted 1, 0.5, -4      sum -2.5 -> -  keep model 3:      -4 / 2          = -2
#   2: weighted 2, 1, 2         sum  5   -> +  keep all:           5 / 3.5        = 10/7
#   3: all zero                 sum  0   -> +  a zero has no sign: nothing kept   = 0
#   4: weighted -1, 2, 0        sum  1   -> +  keep model 2:       2 / 0.5        = 4
#   5: weighted -2, 0.5, 2      sum  0.5 -> +  keep models 2, 3:   2.5 / 2.5      = 1
WEIGHTSMITH = torch.tensor([3.0, -2.0, 10 / 7, 0.0, 4.0, 1.0])
# PEFT: sign from the unweighted sums (1, 0, 5, 0, 3, 0; zero elects +), weighted kept sum / kept count:
#   0: 3/1   1: (1 + 0.5)/2   2: 5/3   3: 0   4: 2/1   5: (0.5 + 2)/2
PEFT = torch.tensor([3.0, 0.75, 5 / 3, 0.0, 2.0, 1.25])


def ties(base: torch.Tensor, tau: torch.Tensor, weights: list[float], density: float = 1.0,
         **overrides) -> torch.Tensor:
    """The registered ``ties`` method on one tensor, with its declared defaults."""
    m = get_method("ties")
    params = {p.name: p.default for p in m.parameters if not p.per_model} | overrides
    per_model = [{"weight": w, "density": density} for w in weights]
    return m.func(base.clone(), [base + t for t in tau], params, per_model, TensorContext(name="t"))


def test_ties_sign_consensus_by_hand():
    assert get_method("ties").param("normalize").default is True  # TIES divides by the kept weights
    out = ties(BASE, TAU, WEIGHTS)
    torch.testing.assert_close(out - BASE, WEIGHTSMITH, rtol=0, atol=1e-6)
    # Non-vacuity: without the consensus (task arithmetic, same weights) the result is another one.
    plain = BASE + (torch.tensor(WEIGHTS).unsqueeze(1) * TAU).sum(0) / sum(WEIGHTS)
    assert not torch.allclose(out, plain, atol=1e-3)


def test_ties_departs_from_peft_where_it_says():
    from peft.utils.merge_utils import ties as peft_ties

    peft = peft_ties(list(TAU), torch.tensor(WEIGHTS), density=1.0, majority_sign_method="total")
    torch.testing.assert_close(peft, PEFT, rtol=0, atol=1e-6)  # our reading of PEFT is right
    ours = ties(BASE, TAU, WEIGHTS) - BASE
    differ = (ours - peft).abs() > 1e-4
    assert differ.tolist() == [False, True, True, False, True, True]


def test_ties_trims_before_the_election():
    # density 0.5 keeps each model's two largest entries of four; then the election, as above.
    tau = torch.tensor([[4.0, -3.0, 1.0, 0.5], [-1.0, 2.0, -5.0, 0.25]])
    # kept: [4, -3, 0, 0] and [0, 2, -5, 0]; w = 1, 1
    #   0: 4, 0 -> + -> 4/1    1: -3, 2 -> - -> -3/1    2: 0, -5 -> - -> -5/1    3: nothing -> 0
    base = torch.zeros(4)
    out = ties(base, tau, [1.0, 1.0], density=0.5)
    torch.testing.assert_close(out, torch.tensor([4.0, -3.0, -5.0, 0.0]), rtol=0, atol=0)
    # Non-vacuity: untrimmed, columns 0-2 elect the same signs and keep the same entries
    # ((4, -1) -> +, (-3, 2) -> -, (1, -5) -> -), but column 3 keeps both: (0.5 + 0.25) / 2 = 0.375.
    full = ties(base, tau, [1.0, 1.0], density=1.0)
    torch.testing.assert_close(full, torch.tensor([4.0, -3.0, -5.0, 0.375]), rtol=0, atol=1e-7)
