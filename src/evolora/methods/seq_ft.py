"""Sequential full fine-tuning: every weight trains, task after task. The lower bound on forgetting."""

from __future__ import annotations

from dataclasses import dataclass

from evolora.methods.base import Method
from evolora.methods.registry import register


@dataclass
class SeqFTOptions:
    train_embeddings: bool = False
    """Tied input/output embeddings are most of a small model's weights; frozen by default."""


@register
class SeqFT(Method):
    name = "seq_ft"
    fsdp_ready = True
    Options = SeqFTOptions
    export_form = "full"

    def setup(self, model, ctx):
        embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
        for param in model.parameters():
            if self.options.train_embeddings or id(param) not in embeddings:
                param.requires_grad_(True)
        return model
