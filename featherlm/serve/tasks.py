"""The non-generative endpoints' model work: sentence embeddings and task-run dispatch.

Plain functions on a model and token ids, so they can be tested without a server and run in a worker
thread (a forward pass must not block the event loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EMBED_BATCH = 32  # texts per forward pass: bounds the padded activations of one pass


@torch.inference_mode()
def embed(model, inputs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Sentence embeddings (N, C), float32: the mean of the final hidden states over the real tokens,
    L2-normalised, which is what sentence-transformers computes for all-MiniLM-L6-v2 (its Pooling
    module in mean mode followed by Normalize).

    Inputs are grouped by length so little compute goes into padding (right padding, masked).
    """
    out = torch.empty(len(inputs), model.config.d_model)
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    device = model.embed_tokens.weight.device
    for start in range(0, len(order), EMBED_BATCH):
        chunk = order[start:start + EMBED_BATCH]
        width = max(len(inputs[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, :len(inputs[i])] = torch.tensor(inputs[i])
            mask[row, :len(inputs[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(ids, attention_mask=mask).hidden.float()  # (B, T, C)
        weights = mask[..., None].float()  # (B, T, 1)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, C)
        out[chunk] = F.normalize(mean, p=2, dim=-1).cpu()
    return out


def truncate_all(batch: list[list[int]], max_len: int, affixes: tuple[int, int]) -> list[list[int]]:
    """Cut each id list to ``max_len`` keeping its trailing special tokens (as the classifier does)."""
    from featherlm.data.tasks import truncate

    return [truncate(ids, max_len, affixes) for ids in batch]
