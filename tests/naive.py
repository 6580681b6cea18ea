"""Naive references the engine is checked against, written plainly (no cache, no batching), shared by the
tests of several modules."""

from __future__ import annotations

import math

import torch

from langchain_packllm.alignment import MinEDMap


def mined_cols(logits: torch.Tensor, mined: MinEDMap) -> torch.Tensor:
    """A member's logits read on the reference vocabulary: the logit of each reference token's MinED image,
    less log n where n reference tokens share that image (each gets 1/n of its probability)."""
    ids = torch.as_tensor(mined.ids)
    shared = torch.bincount(ids, minlength=mined.dst_vocab_size)[ids]
    return logits[..., ids] - torch.log(shared.double()).to(logits)


def plain_bits_per_byte(members, text: str) -> list[float]:
    """Bits per byte of each member on the same bytes: after the longest first token among the members,
    from each member's first token that starts there (character offsets; these texts are ASCII)."""
    encs = [m.tokenizer(text, return_offsets_mapping=True) for m in members]
    skip = max(next(e for s, e in enc["offset_mapping"] if e > s) for enc in encs)
    out = []
    for m, enc in zip(members, encs, strict=True):
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        start = next(i for i, (s, e) in enumerate(offsets) if e > s and s >= skip)
        with torch.no_grad():
            lp = torch.log_softmax(m.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        nll = -sum(float(lp[i - 1, ids[i]]) for i in range(start, len(ids)))
        out.append(nll / math.log(2) / (len(text) - offsets[start][0]))
    return out
