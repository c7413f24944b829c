"""Contrastive losses, open_clip ``loss.py`` style: stateless, features already gathered by the caller."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather along dim 0 keeping gradients (what ``LightningModule.all_gather(sync_grads=True)``
    does); identity outside torch.distributed. Backward sums each rank's gradient for our slice."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def _rows_and_offset(local: Tensor, gathered: Tensor | None, local_loss: bool, rank: int) -> tuple[Tensor, int]:
    if gathered is None or not local_loss:
        return (local if gathered is None else gathered), 0
    return local, rank * local.shape[0]


class ClipLoss(nn.Module):
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3 pseudocode), unreduced per sample.

    Given this rank's features (B, E) and the features of all ranks (N, E), gathered with
    gradients: ``local_loss=False`` scores the full N x N similarity matrix on every rank;
    ``local_loss=True`` only this rank's B rows against all N columns (B x N memory), targets
    offset by ``rank * B``. Under DDP the mean over ranks of either equals the single-process loss
    on the concatenated batch, and DDP's gradient averaging yields the same gradients.
    """

    def __init__(self, local_loss: bool = False) -> None:
        super().__init__()
        self.local_loss = local_loss

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        all_image_features: Tensor | None = None,
        all_text_features: Tensor | None = None,
        rank: int = 0,
    ) -> Tensor:
        images, offset = _rows_and_offset(image_features, all_image_features, self.local_loss, rank)
        texts, _ = _rows_and_offset(text_features, all_text_features, self.local_loss, rank)
        all_images = image_features if all_image_features is None else all_image_features
        all_texts = text_features if all_text_features is None else all_text_features
        logits_per_image = logit_scale * images @ all_texts.T  # (rows, N)
        logits_per_text = logit_scale * texts @ all_images.T  # (rows, N)
        if logit_bias is not None:
            logits_per_image, logits_per_text = logits_per_image + logit_bias, logits_per_text + logit_bias
        labels = torch.arange(images.shape[0], device=images.device) + offset
        i2t = F.cross_entropy(logits_per_image, labels, reduction="none")
        t2i = F.cross_entropy(logits_per_text, labels, reduction="none")
        return (i2t + t2i) / 2  # (rows,)


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, Alg. 1), unreduced per image row.

    loss_i = -sum_j log sigmoid(z_ij (t * x_i.y_j + b)), z_ij = +1 on the matching pair, -1 elsewhere;
    the mean over rows equals the paper's -sum_ij(...)/|B|. Gathering as in ``ClipLoss`` (this is
    open_clip's ``dist_impl='gather'`` with all columns in one matrix).
    """

    def __init__(self, local_loss: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        all_image_features: Tensor | None = None,
        all_text_features: Tensor | None = None,
        rank: int = 0,
    ) -> Tensor:
        if logit_bias is None:
            raise ValueError(
                "SigLipLoss needs a learnable logit bias: give the model init_logit_bias (SigLIP uses -10, with "
                "init_logit_scale=log(10)) in model_cfg, as conf/model/clip_siglip.yaml does."
            )
        images, offset = _rows_and_offset(image_features, all_image_features, self.local_loss, rank)
        all_texts = text_features if all_text_features is None else all_text_features
        logits = logit_scale * images @ all_texts.T + logit_bias  # (rows, N)
        signs = -torch.ones_like(logits)
        rows = torch.arange(images.shape[0], device=images.device)
        signs[rows, rows + offset] = 1.0
        return -F.logsigmoid(signs * logits).sum(dim=1)  # (rows,)
