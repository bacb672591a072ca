"""The released code's prefill with its loops replaced by Triton kernels ("DMS-8x (Triton)").

The structure of ``hub.py`` (docs/DMS.md, "The hub algorithm") is kept, and each slow step swapped for
a kernel of ours, as the earlier study of this configuration did:

* ``convert_to_left_padding`` (a Python loop over the batch): ``bool_gather_left_pad`` gathers each
  sequence's attended tokens of q, k, v and the decisions, right-aligned;
* the loop over query chunks of 512, each with a dense mask and one SDPA call: one launch of the fused
  kernel over all keys under the element-wise DMS rule (``fused.py`` with no compacted prefix);
* ``restore_order`` (another loop): ``scatter_by_index`` puts every output row back at its token.

The API takes no padding mask (every sequence has N tokens), so the attention mask selects every token
and the permutation is the identity; the moves still run, as they do in the released code.
"""

from __future__ import annotations

import torch

from dms_perf.ops.movers.bool_gather import bool_gather_left_pad
from dms_perf.ops.movers.scatter import scatter_by_index
from dms_perf.ops.prefill.fused import launch_prefill_kernel


def hub_triton_attention(q, k, v, decisions, window, scale, return_lse):
    """Validated inputs as ``dms_prefill_attention`` takes them; returns ``(out, lse or None)``."""
    batch, num_q_heads, n, head_dim = q.shape
    attended = torch.ones((batch, 1, n), dtype=torch.bool, device=q.device)

    def left_padded(x):
        mask = attended.expand(batch, x.shape[1], n).contiguous()
        y, _ = bool_gather_left_pad(x if x.stride(-1) == 1 else x.contiguous(), mask, max_length=n)
        return y

    q_pad, k_pad, v_pad = left_padded(q), left_padded(k), left_padded(v)
    decisions_pad = left_padded(decisions.contiguous().view(torch.uint8).unsqueeze(-1))[..., 0].view(torch.bool)

    out_pad = torch.empty_like(q_pad)
    lse_pad = (
        torch.empty((batch, num_q_heads, n), dtype=torch.float32, device=q.device) if return_lse else out_pad
    )
    launch_prefill_kernel(
        q_pad, k_pad, v_pad, None, None, None, decisions_pad, out_pad, lse_pad, window, scale, return_lse
    )

    # restore_order's index: left-padded row s of a sequence of length L is its token s - (N - L); every
    # sequence has L = N here, so each row goes back to where it is.
    restore = torch.arange(batch * num_q_heads * n, device=q.device)
    out = scatter_by_index(out_pad.view(-1, head_dim), restore, check_index=False).view(q.shape)
    if not return_lse:
        return out, None
    lse = scatter_by_index(lse_pad.view(-1, 1), restore, check_index=False).view(batch, num_q_heads, n)
    return out, lse
