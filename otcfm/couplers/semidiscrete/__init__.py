r"""Semidiscrete OT: pair fresh source samples with a whole finite dataset through fitted dual potentials.

The target is a dataset of ``N`` points ``y_j`` with uniform weights; the source is a continuous
distribution ``mu`` one can sample. The semi-dual of OT with the cost ``c(x, y) = ||x - y||^2`` is

.. math::
    F_\epsilon(g) = \mathbb{E}_{x \sim \mu}\big[g^{c,\epsilon}(x)\big] + \frac{1}{N}\sum_j g_j,\qquad
    g^{c,0}(x) = \min_j\, c(x, y_j) - g_j,\quad
    g^{c,\epsilon}(x) = -\epsilon \log \frac{1}{N}\sum_j e^{(g_j - c(x, y_j))/\epsilon},

concave in ``g``, with gradient ``dF/dg_j = 1/N - P_x(j)``, where ``P_x(j)`` is the share of the source
that goes to ``y_j``: the mass of its Laguerre cell (``epsilon = 0``) or the mean softmax weight
(``epsilon > 0``). At the maximiser every data point receives ``1/N`` of the source, and
``x -> argmin_j c(x, y_j) - g_j`` is the OT map (Mousavi-Hosseini, Zhang, Klein, Cuturi, "Flow Matching
with Semidiscrete Couplings", 2025). The coupler (:mod:`.coupler`) holds the potentials; :mod:`.fit` finds
``g`` by averaged stochastic gradient ascent; pairing a source batch is one scoring of it against the dataset:
``argmax_j 2 x.y_j + g_j - |y_j|^2`` (the ``|x|^2`` term is common to a row), or for ``epsilon > 0`` a
draw from the softmax of the score over ``epsilon`` (Gumbel-max). Scores are computed in chunks of the
dataset under a memory budget, so the ``(B, N)`` score matrix never exists at once; for ``epsilon = 0`` a
certified bfloat16 screen (:mod:`otcfm.couplers.screening`) finds the same partners at about half the cost.

Scale. Inputs whose magnitudes lie far from 1 (beyond ``2^32`` or below ``2^-31`` in float32, where squares
leave the dtype's range or its normal numbers) are scored in units of a power of two ``u`` near their largest
magnitude: ``x / u``, ``y / u`` and costs over ``u^2``, an exact rescaling with the same partners. The unit is
chosen by the fit from the dataset and a source probe; a batch far larger than that unit is scored with all its
scores multiplied by one more power of two. The potentials are kept in cost units in float64.

Memory. Besides the dataset (never copied) and one ``(N,)`` vector per derived quantity (squared norms,
potentials), the fit and the pairing use ``memory_budget`` bytes: scores, and the passes over the dataset
(squared norms, the warm start) go block by block; the bfloat16 screen is used only where its copy of the
dataset fits in the budget too.


Files, by concept: :mod:`.scaling` (units that are powers of two, passes over the dataset in blocks), :mod:`.kernels`
(scores, partners, softmax shares), :mod:`.fit` (the solver, its report and its checkpoint), :mod:`.coupler` (the
coupler: pairing, and the potentials' state, saving and loading).
"""

from otcfm.couplers.semidiscrete.coupler import SemidiscreteCoupler, fingerprint
from otcfm.couplers.semidiscrete.fit import SemidiscreteFit, noise_floor

__all__ = ["SemidiscreteCoupler", "SemidiscreteFit", "fingerprint", "noise_floor"]
