"""LTAD's training diagnostics: the phase-1 collapse check and λ's balance between the two scores of Eq. 5.

Both are logged to the `ltbench.model` logger, which the runner copies into the run's log.txt.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from ltad_model.detector import LTADMeta
    from ltad_model.model import LTADNetwork
    from ltbench.feature_detector import TrainingFeatures

MODEL_LOG = logging.getLogger("ltbench.model")  # the runner copies these records into the run's log.txt
BALANCE_RANGE = (0.1, 10.0)  # λ·spread(S_sem) / spread(S_rec) outside this: one term of Eq. 5 all but silences the other
COLLAPSE_SAMPLE = 64  # training images the phase-1 collapse check looks at (the first ones)
ACTIVE_UNIT_VARIANCE = 0.01  # a latent unit is active when Var_x(μ(x)) exceeds this (Burda et al., 2016)


def lambda_balance(meta: LTADMeta) -> float | None:
    """λ·spread(S_sem) / spread(S_rec): how much of Eq. 5's range the semantic term spans (None: one score only)."""
    if meta.lambda_sem is None or not meta.rec_spread or meta.sem_spread is None:
        return None
    return meta.lambda_sem * meta.sem_spread / meta.rec_spread


def report_balance(meta: LTADMeta) -> None:
    """Log λ's balance between the two scores at the end of training; warn when one term silences the other."""
    balance = lambda_balance(meta)
    if balance is None:
        return
    line = (f"λ = {meta.lambda_sem:.4g} ({meta.lambda_rule}); spread(S_rec) = {meta.rec_spread:.4g}, "
            f"spread(S_sem) = {meta.sem_spread:.4g}; λ·spread(S_sem)/spread(S_rec) = {balance:.3g}")
    if BALANCE_RANGE[0] <= balance <= BALANCE_RANGE[1]:
        MODEL_LOG.info(line)
    else:
        silenced = "S_sem barely moves the ranking" if balance < BALANCE_RANGE[0] else "S_rec barely moves the ranking"
        MODEL_LOG.warning(f"{line}: outside [{BALANCE_RANGE[0]}, {BALANCE_RANGE[1]}], {silenced}; "
                          "set lambda_sem, or compare --set score=rec / score=sem")


@torch.no_grad()
def collapse_check(network: LTADNetwork, data: TrainingFeatures, class_text: Tensor, device: torch.device,
                   epoch: int, seed: int) -> dict[str, float]:
    """Phase-1 posterior-collapse check on the first training images, logged once per epoch.

    Returns (and logs): the KL per latent dimension (mean), the active latent units (variance of μ
    over images above 0.01), the per-element MSE of synthetic vs real features, and that of the
    class-mean feature vs real: synthetic features no closer to the real ones than the class mean
    is what a collapsed VAE produces.
    """
    count = min(COLLAPSE_SAMPLE, len(data))
    chosen = torch.arange(count)
    real = [m[chosen].to(device, torch.float32) for m in data.maps]
    z = data.embeddings[chosen].to(device, torch.float32)
    class_idx = data.class_idx[chosen].to(device)
    generator = torch.Generator().manual_seed(seed)  # its own stream: the check never moves training's draws
    synthetic, mean, log_variance = network.synthesize(z, class_text[class_idx].detach(), generator)
    result: dict[str, float] = {"epoch": float(epoch + 1)}
    if log_variance is not None:
        kl = 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance)  # (n, latent)
        result["kl_per_dim"] = float(kl.mean())
        result["active_units"] = float((mean.var(dim=0) > ACTIVE_UNIT_VARIANCE).sum()) if count > 1 else float("nan")
    result["mse_synthetic"] = float(torch.stack([F.mse_loss(f, r) for f, r in zip(synthetic, real)]).mean())
    class_means = []
    for layer in real:
        means = torch.stack([layer[class_idx == c].mean(0) for c in class_idx.tolist()])  # (n, C_l, H, W)
        class_means.append(F.mse_loss(means, layer))
    result["mse_class_mean"] = float(torch.stack(class_means).mean())
    units = f", active units {result['active_units']:.0f}/{mean.shape[1]}" if "active_units" in result else ""
    kl_text = f"KL per latent dim {result['kl_per_dim']:.4g}{units}; " if "kl_per_dim" in result else ""
    MODEL_LOG.info(f"phase 1 epoch {epoch + 1}: {kl_text}MSE synthetic vs real {result['mse_synthetic']:.4g}, "
                   f"class mean vs real {result['mse_class_mean']:.4g}")
    return result


def spread(values: Tensor) -> float:
    """99th minus 1st percentile of a 1-D tensor."""
    values = values.float()
    if len(values) > 1_000_000:  # torch.quantile's input limit; an even subsample keeps it exact enough
        values = values[:: len(values) // 1_000_000 + 1]
    return float(torch.quantile(values, 0.99) - torch.quantile(values, 0.01))
