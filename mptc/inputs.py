"""Random probe inputs for a spec: what the pass checks, `mptc verify` and the exporters feed a model."""

from __future__ import annotations

import torch

from . import spec as S


def example_inputs(spec: S.Spec, batch: int = 2, seq: int = 8, seed: int = 0,
                   padded: bool = False) -> dict[str, torch.Tensor]:
    """Random inputs for a spec (ids, a padding mask with the last tokens masked if `padded`)."""
    g = torch.Generator().manual_seed(seed)
    p = spec.patches
    image = {"pixel_values": torch.randn(batch, p.channels, p.image, p.image, generator=g)} if p else {}
    if not spec.reads_tokens:
        return image
    if spec.context is not None:
        seq = min(seq, spec.context)
    ids = torch.randint(0, spec.vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if padded:  # right padding, a different amount per row, never a whole row
        for i in range(batch):
            mask[i, seq - min(seq - 1, 1 + i + seq // 4):] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if spec.embed.segments:  # two segments, as in BERT's sentence pairs
        out["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).contiguous()
    if spec.conditions:  # the side input: one vector per example
        out["conditions"] = torch.randn(batch, spec.conditions, generator=g)
    out |= image
    return {k: out[k] for k in spec.inputs}  # in the order of the forward signature and the ONNX inputs
