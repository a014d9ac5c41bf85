"""The BBQRec behaviour-bound tokenizer, and by config switches the TIGER-style RQ-VAE baseline.

BBQRec (default config):
- a behaviour view z_ID: a trainable item embedding (initialised from SASRec) projected to the
  code dimension;
- per modality m, a behaviour-aligned encoder Enc_mB and a modality-specific encoder Enc_mS,
  kept apart by minimising a CLUB upper bound of I(Enc_mB(x); Enc_mS(x));
- one shared residual codebook that quantizes every behaviour-aligned view and z_ID;
- per modality a decoder that reconstructs the features from [specific ; quantized behaviour],
  so the specific branch has to carry what behaviour does not (it cannot collapse);
- in-batch InfoNCE between the quantized views of one item (modality <-> ID, modality <->
  modality) and a behaviour anchor: InfoNCE between an item and an item that follows it in a
  training sequence;
- the semantic ID quantizes the fused view (mean of the behaviour-aligned views and z_ID; without
  interactions, of the behaviour-aligned views alone) through the same codebook.

TIGER-style (`tiger=True`): one encoder over the concatenated content features, one RQ, one
decoder back to the concatenated features; no z_ID, no CLUB, no contrastive terms.

Reads top to bottom: config, helpers, output type, module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.club import CLUB
from model.quantizer import ResidualQuantizer, RQOutput

ID_VIEW = "id"
FUSED_VIEW = "fused"


@dataclass(frozen=True)
class TokenizerConfig:
    modalities: tuple[tuple[str, int], ...]  # (name, input dim), e.g. (("text", 384),)
    num_items: int
    id_dim: int = 64  # dim of the z_ID embedding (SASRec's); 0 disables z_ID ("- z_ID")
    code_dim: int = 32
    hidden: int = 256
    levels: int = 3
    codebook_size: int = 256
    beta: float = 0.25  # commitment weight
    shared_codebook: bool = True  # False: one codebook per view ("- shared codebook")
    club: bool = True  # False: no MI minimisation ("- CLUB")
    contrastive: bool = True  # in-batch InfoNCE between views and the behaviour anchor
    tiger: bool = False  # TIGER-style RQ-VAE on concatenated content features
    temperature: float = 0.1
    w_recon: float = 1.0
    w_rq: float = 1.0
    w_club: float = 0.1
    w_align: float = 0.1
    w_anchor: float = 0.1
    club_hidden: int = 128

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ValueError("a tokenizer needs at least one modality")
        if self.tiger and (self.id_dim or self.club or self.contrastive):
            raise ValueError("tiger=True takes no z_ID, CLUB or contrastive terms")
        if self.codebook_size < 2 or self.levels < 1 or self.code_dim < 1:
            raise ValueError(f"invalid codebook shape in {self}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")

    @property
    def views(self) -> tuple[str, ...]:
        """Names of the quantized behaviour views (modalities, then z_ID when enabled)."""
        names = tuple(name for name, _ in self.modalities)
        return names + ((ID_VIEW,) if self.id_dim else ())


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric in-batch InfoNCE: row i of `a` should match row i of `b` among all rows."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature  # (B, B)
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class TokenizerOutput(NamedTuple):
    loss: Tensor  # () weighted total for the main optimiser
    # always the same keys: recon, rq, club, align, anchor (the loss terms), and two CLUB
    # diagnostics outside the loss: club_raw (the unclamped estimate) and club_clamped (the share
    # of modalities whose estimate was negative in this batch, so the clamp took its gradient)
    parts: dict[str, Tensor]
    codes: Tensor  # (B, L) codes of the fused view


class BBQTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = c = config
        self.names = [name for name, _ in c.modalities]
        in_dims = dict(c.modalities)
        if c.tiger:
            total = sum(in_dims.values())
            self.encoder = mlp(total, c.hidden, c.code_dim)
            self.decoder = mlp(c.code_dim, c.hidden, total)
        else:
            self.enc_b = nn.ModuleDict(
                {m: mlp(d, c.hidden, c.code_dim) for m, d in in_dims.items()}
            )
            self.enc_s = nn.ModuleDict(
                {m: mlp(d, c.hidden, c.code_dim) for m, d in in_dims.items()}
            )
            self.dec = nn.ModuleDict(
                {m: mlp(2 * c.code_dim, c.hidden, d) for m, d in in_dims.items()}
            )
            if c.club:
                self.club = nn.ModuleDict(
                    {
                        m: CLUB(x_dim=c.code_dim, y_dim=c.code_dim, hidden=c.club_hidden)
                        for m in in_dims
                    }
                )
        if c.id_dim:
            self.id_emb = nn.Embedding(c.num_items, c.id_dim)
            self.id_proj = nn.Linear(c.id_dim, c.code_dim)

        def rq() -> ResidualQuantizer:
            return ResidualQuantizer(
                dim=c.code_dim, levels=c.levels, codebook_size=c.codebook_size, beta=c.beta
            )

        keys = (FUSED_VIEW,) if c.tiger else (*c.views, FUSED_VIEW)
        if c.shared_codebook:
            shared = rq()
            self.quantizers = nn.ModuleDict({FUSED_VIEW: shared})
        else:
            self.quantizers = nn.ModuleDict({k: rq() for k in keys})
        # Extra ID level: separates items whose L codes collide; fitted after code assignment.
        self.extra_level = nn.Embedding(c.codebook_size, c.code_dim)
        nn.init.zeros_(self.extra_level.weight)

    def quantizer(self, view: str) -> ResidualQuantizer:
        q = self.quantizers[view if view in self.quantizers else FUSED_VIEW]
        assert isinstance(q, ResidualQuantizer)
        return q

    def estimator(self, modality: str) -> CLUB:
        club = self.club[modality]
        assert isinstance(club, CLUB)
        return club

    def estimator_parameters(self) -> list[nn.Parameter]:
        """Parameters of the CLUB estimators: stepped by their own optimiser, not the main one."""
        return list(self.club.parameters()) if hasattr(self, "club") else []

    def main_parameters(self) -> list[nn.Parameter]:
        own = {id(p) for p in self.estimator_parameters()} | {id(self.extra_level.weight)}
        return [p for p in self.parameters() if id(p) not in own]

    # -- views -----------------------------------------------------------------------------

    def behaviour_views(
        self, features: dict[str, Tensor], items: Tensor | None
    ) -> dict[str, Tensor]:
        """Pre-quantization behaviour-aligned views (B, code_dim); z_ID only when `items`."""
        if self.config.tiger:
            return {FUSED_VIEW: self.encoder(torch.cat([features[m] for m in self.names], dim=-1))}
        # Unit-norm views: the reconstruction path does not need the behaviour view's scale, so
        # without this the commitment loss shrinks every view towards 0 and the codebook collapses.
        views = {m: F.normalize(self.enc_b[m](features[m]), dim=-1) for m in self.names}
        if self.config.id_dim and items is not None:
            views[ID_VIEW] = F.normalize(self.id_proj(self.id_emb(items)), dim=-1)
        return views

    def fuse(self, views: dict[str, Tensor]) -> Tensor:
        """The view the semantic ID quantizes: the mean of the available behaviour views."""
        if FUSED_VIEW in views:
            return views[FUSED_VIEW]
        return F.normalize(torch.stack(list(views.values())).mean(dim=0), dim=-1)

    def encode(self, features: dict[str, Tensor], items: Tensor | None = None) -> Tensor:
        """(B, code_dim) fused view; `items=None` is a new item known by its features alone."""
        return self.fuse(self.behaviour_views(features, items))

    def codes(self, features: dict[str, Tensor], items: Tensor | None = None) -> Tensor:
        """(B, L) codes of the fused view (deterministic in eval mode)."""
        out: RQOutput = self.quantizer(FUSED_VIEW)(self.encode(features, items))
        return out.codes

    def decode_sid(self, sid: Tensor) -> Tensor:
        """(B, L + 1) semantic IDs -> (B, code_dim): codewords plus the extra-level embedding."""
        L = self.config.levels
        extra: Tensor = self.extra_level(sid[:, L])
        return self.quantizer(FUSED_VIEW).decode(sid[:, :L]) + extra

    def reconstruct(self, features: dict[str, Tensor], items: Tensor | None) -> dict[str, Tensor]:
        """Per modality, the decoder's reconstruction of the features from the quantized view."""
        views = self.behaviour_views(features, items)
        if self.config.tiger:
            q: Tensor = self.quantizer(FUSED_VIEW)(views[FUSED_VIEW]).quantized
            recon = self.decoder(q)
            dims = [d for _, d in self.config.modalities]
            return dict(zip(self.names, torch.split(recon, dims, dim=-1), strict=True))
        out = {}
        for m in self.names:
            qm: Tensor = self.quantizer(m)(views[m]).quantized
            out[m] = self.dec[m](torch.cat([self.enc_s[m](features[m]), qm], dim=-1))
        return out

    # -- training --------------------------------------------------------------------------

    def estimator_loss(self, features: dict[str, Tensor]) -> Tensor:
        """Negative CLUB log-likelihood on detached (behaviour, specific) pairs."""
        loss = next(self.parameters()).new_zeros(())
        if self.config.tiger or not self.config.club:
            return loss
        for m in self.names:
            b = self.enc_b[m](features[m]).detach()
            s = self.enc_s[m](features[m]).detach()
            loss = loss - self.estimator(m).log_likelihood(b, s)
        return loss

    def forward(
        self,
        features: dict[str, Tensor],
        items: Tensor,
        next_features: dict[str, Tensor] | None = None,
        next_items: Tensor | None = None,
    ) -> TokenizerOutput:
        """One batch of items; for the behaviour anchor, `next_*` hold one successor per item
        (a successor of -1 means the item has none and is left out of the anchor term)."""
        c = self.config
        zero = features[self.names[0]].new_zeros(())
        parts = dict.fromkeys(
            ("recon", "rq", "club", "align", "anchor", "club_raw", "club_clamped"), zero
        )

        views = self.behaviour_views(features, items)
        fused = self.fuse(views)
        fused_q = self.quantizer(FUSED_VIEW)(fused)
        parts["rq"] = fused_q.loss
        if c.tiger:
            target = torch.cat([features[m] for m in self.names], dim=-1)
            recon = self.decoder(fused_q.quantized)
            parts["recon"] = F.mse_loss(recon, target, reduction="none").sum(-1).mean()
        else:
            quantized: dict[str, Tensor] = {}
            for view, z in views.items():
                out = self.quantizer(view)(z)
                quantized[view] = out.quantized
                parts["rq"] = parts["rq"] + out.loss
            for m in self.names:
                specific = self.enc_s[m](features[m])
                recon = self.dec[m](torch.cat([specific, quantized[m]], dim=-1))
                parts["recon"] = (
                    parts["recon"] + F.mse_loss(recon, features[m], reduction="none").sum(-1).mean()
                )
                if c.club:
                    estimator = self.estimator(m)
                    parts["club"] = parts["club"] + estimator.mi_upper_bound(views[m], specific)
                    with torch.no_grad():
                        raw = estimator.estimate(views[m], specific)
                    parts["club_raw"] = parts["club_raw"] + raw
                    parts["club_clamped"] = parts["club_clamped"] + (raw < 0).float() / len(
                        self.names
                    )
            if c.contrastive:
                names = list(quantized)
                for i, a in enumerate(names):
                    for b in names[i + 1 :]:
                        parts["align"] = parts["align"] + info_nce(
                            quantized[a], quantized[b], c.temperature
                        )
                if next_features is not None and next_items is not None:
                    has = next_items >= 0  # (B,)
                    if int(has.sum()) > 1:
                        nxt_f = {m: f[has] for m, f in next_features.items()}
                        nxt = self.quantizer(FUSED_VIEW)(self.encode(nxt_f, next_items[has]))
                        parts["anchor"] = info_nce(
                            fused_q.quantized[has], nxt.quantized, c.temperature
                        )
        loss = (
            c.w_recon * parts["recon"]
            + c.w_rq * parts["rq"]
            + c.w_club * parts["club"]
            + c.w_align * parts["align"]
            + c.w_anchor * parts["anchor"]
        )
        return TokenizerOutput(loss=loss, parts=parts, codes=fused_q.codes)
