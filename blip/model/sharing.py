"""Text encoder/decoder parameter sharing for pre-training (paper Table 3).

Sharing means the encoder's modules hold the *same* ``nn.Parameter`` objects as the decoder's
(BLIP's ``tie_encoder_decoder_weights``), so one optimizer step updates both and
``model.parameters()`` counts each once.
"""

from __future__ import annotations

from torch import nn

from .config import SHARING_STRATEGIES

# Module-path components whose parameters stay separate, per strategy. "attention" is the
# self-attention block; "crossattention" is a different component and so is still shared under
# all_except_sa, exactly like the official skip key '/attention'.
_NOT_SHARED: dict[str, tuple[str, ...] | None] = {
    "all": (),
    "all_except_ca": ("crossattention",),
    "all_except_sa": ("attention",),
    "none": None,
}


def tie_text_towers(encoder: nn.Module, decoder_bert: nn.Module, strategy: str) -> list[str]:
    """Make ``encoder`` share ``decoder_bert``'s parameters according to ``strategy``.

    Returns the names (relative to the towers) of the shared parameters.
    """
    if strategy not in _NOT_SHARED:
        raise ValueError(f"unknown sharing strategy {strategy!r}; use one of {SHARING_STRATEGIES}")
    skip = _NOT_SHARED[strategy]
    if skip is None:
        return []
    shared = []
    for name, enc_mod in encoder.named_modules():
        if skip and any(part in skip for part in name.split(".")):
            continue
        dec_mod = decoder_bert.get_submodule(name)
        for pname, p in list(enc_mod.named_parameters(recurse=False)):
            q = getattr(dec_mod, pname)
            if p.shape != q.shape:
                raise ValueError(f"cannot share {name}.{pname}: encoder {tuple(p.shape)} vs decoder {tuple(q.shape)}")
            setattr(enc_mod, pname, q)
            shared.append(f"{name}.{pname}" if name else pname)
    return shared
