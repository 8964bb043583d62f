"""Pre-trained encoder + stem into an nnU-Net-built network (ours and nnssl's checkpoints).

The transfer rules are `downstream.transfer`'s: only the adaptation plan's encoder and stem move
(the decoder keeps nnU-Net's init), the input projection is repeated / C for C input channels,
Primus position embeddings are interpolated to the fine-tuning token grid, nnssl's misspelt
`key_to_in_proj`, DDP / compile prefixes and plan-less Spark checkpoints are understood. A
checkpoint of another architecture than the plans' fails naming the first missing or mis-shaped key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import nn

from openmind_bench.downstream import transfer


def load_pretrained(network: nn.Module, checkpoint: str | Path, patch_size: Sequence[int]) -> tuple[list[str], bool]:
    """Load into `network` in place; returns (loaded state-dict keys, input channels were repeated)."""
    pretrained = transfer.read_pretrained(checkpoint)
    loaded = transfer.transfer(pretrained, network, [int(p) for p in patch_size])
    weights = transfer.network_named_weights(pretrained, network)
    repeated = False
    state = network.state_dict()
    for key in getattr(network, "keys_to_in_proj", []):
        weight = f"{key}.weight"
        if weight in weights and weight in state:
            repeated |= weights[weight].shape[1] != state[weight].shape[1]
    return loaded, repeated
