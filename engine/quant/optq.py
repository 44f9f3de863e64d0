"""OPTQ (a.k.a. GPTQ; Frantar et al. 2023): group-wise integer weights chosen with the layer's Hessian.

Columns are rounded one at a time; each rounding error is spread over the
columns not yet rounded in proportion to the inverse Hessian
``H = 2 X^T X / N`` of the layer's calibration inputs, so the output error
``tr((W - Q) H (W - Q)^T)`` stays far below round-to-nearest.  Updates are
applied lazily, a block of columns at a time.

The result is an ordinary :class:`GroupQuantizedWeight` (same codes, scales and
zero points as round-to-nearest, same grid from
:func:`~engine.quant.groupwise.range_params`):

* ``act_order``: columns are processed in order of decreasing ``H_ii``.  With
  dynamic groups the groups are contiguous in that order, so the weight stores
  its columns permuted (``perm``).  With ``static_groups`` the group ranges are
  fixed up front on the original column order from the unmodified weight, so
  the weight is stored in original order and needs no permutation.
* a group's range is taken from the up-to-date (error-compensated) weights when
  the group's first column is reached; lazy blocks are cut so that no group
  straddles a block boundary unless it starts one, which keeps that exact.
* ``clip_search``: a group's range is the min/max range shrunk by the factor
  (1.0 down to 0.21) that minimizes the ``H_ii``-weighted rounding error of the
  group, instead of the full min/max range (the reference code's ``mse``
  option, with a Hessian-weighted error).
* dead inputs (``H_ii == 0``: the input is always zero) get ``H_ii = 1`` and a
  zero weight column, as their weights never affect the output.
"""

from __future__ import annotations

import torch

from engine.errors import EngineError
from engine.options import Option
from engine.quant.base import LayerStats, Quantizer, register_quantizer
from engine.quant.groupwise import GROUPWISE_OPTIONS, GroupQuantizedWeight, check_settings, quantize_codes, range_params


def hessian_diagonal(stats: LayerStats) -> torch.Tensor:
    """The diagonal of ``H = 2 X^T X / N``, as :attr:`LayerStats.hessian` computes it, without the matrix."""
    return 2.0 * stats.xtx.diagonal() / max(stats.count, 1)


def inverse_hessian_factor(
    stats: LayerStats, damp: float, dead: torch.Tensor | None = None, perm: torch.Tensor | None = None
) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1``, in the statistics' dtype: ``H`` with
    its dead inputs' diagonal set to 1, rows and columns in the order ``perm``.

    Row ``i`` of ``U``, scaled by ``1 / U_ii``, is how the rounding error of
    column ``i`` is spread over columns ``i..n`` (OPTQ's Cholesky reformulation).
    At most two matrices of ``H``'s size are alive beside the statistics, which are one of them when they are
    disposable (:meth:`LayerStats.take_hessian`).
    """
    h = stats.take_hessian()
    if dead is not None:
        h.diagonal()[dead] = 1.0
    if perm is not None:
        h = h[perm]
        h = h[:, perm]
    h.diagonal().add_(damp * h.diagonal().mean())
    chol, info = torch.linalg.cholesky_ex(h)
    del h
    if info.item() != 0:
        raise EngineError(f"Hessian is not positive definite even after dampening {damp}; raise damp")
    inverse = torch.cholesky_inverse(chol)
    del chol
    return torch.linalg.cholesky(inverse, upper=True)


CLIP_SHRINKS = [1.0 - i / 100 for i in range(80)]  # range shrink factors tried by the clip search
# Elements of one batch of candidate roundings: 4 MiB in float32, reused in place.  A batch of fresh 64 MiB
# temporaries per operation made the search bound by page faults (7x slower for a 7B-shaped block on a CPU).
SEARCH_CHUNK = 1 << 20


def searched_ranges(
    w: torch.Tensor, importance: torch.Tensor, bits: int, symmetric: bool, shrinks: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of the columns ``w``, the min/max range shrunk by whichever factor in
    ``shrinks`` gives the least rounding error ``sum_c importance_c (w_c - q_c)^2`` (first one on ties).

    Clipping a few outliers buys a finer grid for all other weights; ``importance``
    (the Hessian diagonal) says which columns' errors matter.  The candidates are
    tried a few at a time in one buffer, each operation in place.
    """
    w = w.float()
    w_min, w_max = w.amin(dim=1), w.amax(dim=1)
    step = min(len(shrinks), max(1, SEARCH_CHUNK // w.numel()))
    buffer = torch.empty(step, *w.shape, device=w.device)
    best_err = best_scale = best_zero = None
    for c0 in range(0, len(shrinks), step):
        shrink = torch.tensor(shrinks[c0 : c0 + step], dtype=w.dtype, device=w.device).unsqueeze(1)  # [S, 1]
        scale, zero = range_params(shrink * w_min, shrink * w_max, bits, symmetric)  # [S, rows]
        s, z, out = scale.unsqueeze(-1), zero.unsqueeze(-1), buffer[: len(shrink)]
        quantize_codes(w, s, z, bits, out=out).sub_(z).mul_(s)
        err = torch.sub(w, out, out=out).square_().mul_(importance).sum(dim=-1)
        pick = err.argmin(dim=0, keepdim=True)  # the first minimum
        err, scale, zero = err.gather(0, pick)[0], scale.gather(0, pick)[0], zero.gather(0, pick)[0]
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _block_end(start: int, block_size: int, group_size: int, n: int) -> int:
    """End of the lazy block at ``start``: no group may begin inside it and end after it."""
    end = min(start + block_size, n)
    last_group_start = end // group_size * group_size
    if end < n and last_group_start > start:
        end = last_group_start
    return end


@register_quantizer
class OPTQQuantizer(Quantizer):
    """OPTQ / GPTQ with dampening, act-order, static or dynamic groups and lazy block updates."""

    name = "optq"
    needs_calibration = True
    uses_up_statistics = True
    options = {
        **GROUPWISE_OPTIONS,
        "act_order": Option("bool", True, "Quantize columns by decreasing Hessian diagonal."),
        "static_groups": Option("bool", False, "Fix the group ranges before any column is updated."),
        "clip_search": Option("bool", True, "Shrink each group's range where that lowers the Hessian-weighted error."),
        "damp": Option("float", 0.01, "Hessian dampening, a fraction of its mean diagonal.", minimum=0.0),
        "block_size": Option("int", 128, "Columns per lazy-update block.", minimum=1),
    }

    def validate(self) -> None:
        check_settings(self.bits, self.group_size)

    def _ranges(self, w: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.clip_search:
            return searched_ranges(w, importance.float(), self.bits, self.symmetric, CLIP_SHRINKS)
        return range_params(w.amin(dim=1), w.amax(dim=1), self.bits, self.symmetric)

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None = None) -> GroupQuantizedWeight:
        out_f, in_f = weight.shape
        if stats is None:
            raise EngineError("optq needs calibration statistics (--calib FILE)")
        if tuple(stats.xtx.shape) != (in_f, in_f):
            raise EngineError(f"calibration statistics are {tuple(stats.xtx.shape)}, layer needs ({in_f}, {in_f})")
        G = check_settings(self.bits, self.group_size, in_f)
        n_groups = -(-in_f // G)

        w = weight.detach().float().clone()
        diagonal = hessian_diagonal(stats).to(w.device)  # before inverse_hessian_factor may use them up
        dead = diagonal == 0
        diagonal[dead] = 1.0
        w[:, dead] = 0.0

        scales = torch.empty(out_f, n_groups, device=w.device)
        zeros = torch.empty(out_f, n_groups, device=w.device)
        if self.static_groups:  # one range per original-order group, fixed before any update
            for g in range(n_groups):
                cols = slice(g * G, (g + 1) * G)
                scales[:, g], zeros[:, g] = self._ranges(w[:, cols], diagonal[cols])
        perm = torch.argsort(diagonal, descending=True, stable=True) if self.act_order else None
        if perm is not None:
            w = w[:, perm]
            diagonal = diagonal[perm]
        u = inverse_hessian_factor(stats, self.damp, dead, perm).float()

        # static groups follow the original column order, dynamic ones the processing order
        order = perm if self.static_groups and perm is not None else torch.arange(in_f, device=w.device)
        group_of = (order // G).tolist()
        codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=w.device)
        update = torch.empty(out_f, self.block_size, device=w.device)  # one column's spread error, reused
        i1 = 0
        while i1 < in_f:
            i2 = _block_end(i1, self.block_size, G, in_f)
            block = w[:, i1:i2].clone()
            errors = torch.empty_like(block)
            for i in range(i2 - i1):
                col = i1 + i
                group = group_of[col]
                if not self.static_groups and col % G == 0:
                    # this group's columns are up to date: all inside this block, or the block starts here
                    group_cols = torch.cat([block[:, i : i + G], w[:, i2 : col + G]], dim=1)
                    importance = diagonal[col : col + G]
                    scales[:, group], zeros[:, group] = self._ranges(group_cols, importance)
                scale, zero = scales[:, group], zeros[:, group]
                q = quantize_codes(block[:, i], scale, zero, self.bits)
                codes[:, col] = q.to(torch.uint8)
                err = (block[:, i] - scale * (q - zero)) / u[col, col]
                block[:, i:] -= torch.mul(err.unsqueeze(1), u[col, col:i2].unsqueeze(0), out=update[:, : i2 - col])
                errors[:, i] = err
            w[:, i2:] -= errors @ u[i1:i2, i2:]
            i1 = i2

        stored_perm = None
        if perm is not None and not self.static_groups:
            stored_perm = perm  # dynamic groups are contiguous in processing order
        elif perm is not None:
            codes = codes[:, torch.argsort(perm)]  # static groups live in original order
        return GroupQuantizedWeight(
            codes,
            scales,
            None if self.symmetric else zeros.to(torch.uint8),
            bits=self.bits,
            group_size=G,
            in_features=in_f,
            perm=stored_perm,
        )
