"""One optimizer step: the LM loss at the label positions plus the extensions' weighted losses."""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from beni_model.chat import IGNORE_INDEX
from beni_model.config import BeniConfig
from beni_model.data import DevicePixels, to_device
from beni_model.modeling import check_image_tokens
from beni_model.training.metrics import train_flops
from beni_model.training.model import beni_of
from beni_model.training.parallel import under_autocast


def labeled_loss(model, inputs: dict, labels: torch.Tensor, num_items: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
    """Summed cross-entropy / num_items, with the LM head run only at the columns that predict some label:
    image and prompt positions (most of a VLM batch) never reach the vocabulary-sized logits. `labels` stay on
    the host, where the loader left them. Also returns the extensions' losses where `inputs` has their targets."""
    device = inputs["input_ids"].device
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # labels still on the host: no device sync
    out = model(**inputs, logits_to_keep=to_device(keep, device), use_cache=False)
    targets = to_device(targets[:, keep], device).flatten()
    loss = (fused_cross_entropy if device.type == "cuda" else cross_entropy)(out.logits.flatten(0, 1), targets)
    return loss / num_items, out.extension_losses


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the targets that are not IGNORE_INDEX, computed in fp32."""
    return nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


# Compiled, on the GPU: one fused pass each way over the bf16 logits instead of an fp32 copy of them, its softmax and
# their gradient in fp32 (the vocabulary is wide: 4.7 of the small config's 90.7 GPU ms per step).
fused_cross_entropy = torch.compile(cross_entropy, dynamic=True)


def samples_in(batch: dict) -> int:
    """Rows of a padded batch; starts of real sequences (position 0 on a real token) in a packed one."""
    if "position_ids" not in batch:
        return len(batch["input_ids"])
    return int(((batch["position_ids"] == 0) & batch["attention_mask"].bool()).sum())


@dataclass
class StepStats:
    """A step's numbers, left on the device so the host can queue the next step: `host()` waits for this one."""

    values: torch.Tensor  # LM loss, extensions' loss, grad norm, then the global tokens, samples, images, flops
    extensions_only: bool
    has_extension_loss: bool

    def host(self) -> dict:
        lm_loss, extension_loss, grad_norm, tokens, samples, images, flops = self.values.tolist()
        return {
            "loss": extension_loss if self.extensions_only else lm_loss,
            "extension_loss": extension_loss if self.has_extension_loss else None,
            "grad_norm": grad_norm,
            "skipped": not math.isfinite(grad_norm),
            "tokens": tokens,
            "samples": samples,
            "images": images,
            "flops": flops,
        }


def train_step(
    model,
    micro: list[dict],
    optimizer,
    trainable: list,
    max_grad_norm: float,
    beni_config: BeniConfig,
    device: torch.device,
    pixels: DevicePixels,
    weights: dict[str, float] | None = None,
    extensions_only: bool = False,
) -> StepStats:
    """One optimizer step over the micro-batches (gradient sync on the last only); loss is the token mean over every
    rank's label tokens, plus the extensions' losses by their `weights` (the sum's mean over micro-batches and ranks)
    where the batches carry their targets; `pixels` finishes the loader's uint8 images on the device; `extensions_only`
    (the encoder stage) trains on that sum alone and never runs the LLM. The step never waits on the device: `optimizer`
    is a fused one (AdamW(fused=True)), which skips a step whose gradient norm is not finite on the device, on every
    rank alike (the norm is global), so one overflow never turns the weights into NaN. The stats (see StepStats.host):
    the loss (the LM's; the extensions' when `extensions_only`), the extensions' weighted loss (None without targets),
    grad norm, whether the step was skipped and the step's global counts (no text tokens when `extensions_only`)."""
    world_size = dist.get_world_size()
    weights = weights or {}
    target_keys = tuple(k for e in beni_of(model).extensions.values() for k in e.batch_keys) if weights else ()
    for b in micro:
        check_image_tokens(
            int((b["input_ids"] == beni_config.image_token_id).sum()), len(b.get("pixel_values", ())), beni_config.num_image_tokens()
        )
    counts = torch.tensor(
        [
            sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro),
            0 if extensions_only else sum(int(b["attention_mask"].sum()) for b in micro),
            sum(samples_in(b) for b in micro),
            sum(len(b.get("pixel_values", ())) for b in micro),
            sum(
                train_flops(
                    beni_config, 0 if extensions_only else b["input_ids"].numel(), b["input_ids"].shape[1], len(b.get("pixel_values", ()))
                )
                for b in micro
            ),
        ],
        dtype=torch.float64,
    )
    counts = to_device(counts, device)
    dist.all_reduce(counts)
    num_items = counts[0].float() / world_size  # FSDP averages the ranks' gradients
    sums = torch.zeros(2, device=device)  # LM loss, extensions' loss: one all-reduce for both
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=under_autocast(device, world_size))
    for i, batch in enumerate(micro):
        if world_size > 1:
            model.set_requires_gradient_sync(i == len(micro) - 1)
        # Packed rows go without attention_mask: transformers then builds the per-sample causal mask from position_ids.
        # Padded rows go without one too: their padding is on the right, after every real token, so causal attention
        # never reads it, and SDPA runs its causal kernel instead of building and applying a padding mask.
        inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "position_ids") if k in batch}
        if "pixel_values" in batch:
            inputs["pixel_values"] = pixels(batch["pixel_values"], dist.get_rank(), batch.get("position", {}).get("step", 0))
        if targets := {k: batch[k].to(device, non_blocking=True) for k in target_keys if k in batch}:
            inputs["extension_targets"] = targets
        if extensions_only:
            with autocast:
                extra = weighted(model(pixel_values=inputs["pixel_values"], extension_targets=targets).extension_losses, weights)
            (extra / len(micro)).backward()
            sums[1] += extra.detach() / len(micro)
            continue
        with autocast:
            loss, losses = labeled_loss(model, inputs, batch["labels"], num_items)
        if (extra := weighted(losses, weights)) is not None:
            (loss + extra / len(micro)).backward()
            sums[1] += extra.detach() / len(micro)
        else:
            loss.backward()
        sums[0] += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    optimizer.found_inf = (~grad_norm.isfinite()).float()  # read by a fused optimizer's step, as under a GradScaler
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(sums)
    values = torch.cat([(sums / world_size).double(), grad_norm.double().view(1), counts[1:]])
    return StepStats(values, extensions_only, any(k in b for b in micro for k in target_keys))


def weighted(losses: dict[str, torch.Tensor] | None, weights: dict[str, float]) -> torch.Tensor | None:
    """The sum of the extensions' losses by their weights; None where none has a loss this step."""
    terms = [weights[name] * loss for name, loss in (losses or {}).items() if name in weights]
    return sum(terms[1:], terms[0]) if terms else None
