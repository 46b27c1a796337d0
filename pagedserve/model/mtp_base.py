"""What every multi-token-prediction drafter shares (model/mtp.py, model/qwen3_next_mtp.py):
one decoder layer of the target's kind over the target's own embedding or LM head, drafting
through the EAGLE proposer (worker/eagle_proposer.py) as an EAGLE-1 head does."""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedserve.model.layers.attention import PagedAttention


class MtpBase(nn.Module):
    version = 1  # (the proposer keeps the target's final hidden states as features, as EAGLE-1's)
    cuda_graph_safe = False
    tie_word_embeddings = False

    def __init__(self, cfg: Any, target: nn.Module) -> None:
        super().__init__()
        self.config = cfg
        # The target's checkpoint names and fusions for its layer (LlamaForCausalLM.load_weights).
        self.stacked_params, self.renamed = type(target).stacked_params, type(target).renamed
        self._target = (target,)  # not a submodule: its weights are the target's
        self.layers = nn.ModuleList()  # the subclass's one decoder layer

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def attention_layers(self) -> list[PagedAttention]:
        return [self.layers[0].self_attn.attn]
