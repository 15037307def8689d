"""What one optimizer step computes for ALBEF: ITC with momentum distillation over feature queues, and, with a
fusion encoder, image-text matching on hard negatives and masked language modelling.

One step over ``k`` micro-batches (every forward of the trainable model goes through ``train_model``, the DDP
wrapper when there is one)::

    teacher:  momentum features (and image tokens) of every micro-batch, no grad
              keys = [momentum features of the whole step's batch, gathered from all ranks ; queue]
    student:  for each micro-batch: online features -> MoD-ITC of its rows against the keys
              (``loss.gather``: ``local``/``global`` use every rank's momentum features as batch keys; ``none``
              only this rank's, as the original ALBEF; the queue always receives every rank's)
              (+ ITM: fused [CLS] of the positive pairs and of one hard negative per image and per text)
              (+ MLM: 15 % of the tokens masked, predicted from the fused states, momentum soft labels)
              -> (weighted sum) / k -> backward (gradient sync on the last micro-batch only)
    hook:     after the optimizer step: clamp the temperature, EMA update, enqueue the gathered momentum features

With ``albef.batch_keys=momentum`` (ALBEF) the keys are constants, so the rows of each micro-batch see the same
negatives as one big batch would: summed micro-batch gradients equal the big batch's without GradCache's second
pass. With ``albef.batch_keys=online`` the batch part of the keys is the online features with gradient (CLIP's
in-batch ITC; the soft targets still use the teacher's keys): every micro-step then scores the whole step's rows,
the other micro-batches' features cached from a replayed no-grad pass, as the CLIP task does.

Schedules, pure functions of the step (:class:`StepValues`): the distillation weight alpha, the fusion objectives'
weight ramp (``albef.fusion_warmup_steps``) and the ITM sampler's hardness (``albef.itm_hard_warmup_steps``).
Randomness (MLM masks, negative sampling) comes from the global torch generator, which checkpoints save per rank:
a resumed run is identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlp import distributed
from vlp.config import Config, ConfigError
from vlp.losses import itm_loss, mask_tokens, mlm_loss, momentum_distilled_itc, sample_hard_negatives
from vlp.models.momentum import MomentumEncoder
from vlp.training.queue import FeatureQueue
from vlp.training.rng import capture_rng, restore_rng
from vlp.training.schedules import alpha_at, linear_warmup, momentum_at
from vlp.training.step_context import StepContext, gradient_sync, trainable_parameters
from vlp.training.task import batch_groups, clamp_logit_scale, splice_features, spread_gradient, step_groups
from vlp.training.task_registry import register_task
from vlp.types import Batch, LossOutput, ModelOutput

MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the autocast dtype of each precision


@dataclass(frozen=True)
class StepValues:
    """The ALBEF schedules' values at one optimizer step (pure functions of the step).

    alpha: the distillation weight; fusion_scale: the multiplier of ``itm_weight`` and ``mlm_weight`` (their
    warm-up); itm_hardness: h of the ITM negative sampler, softmax(h * similarity) (0: uniformly random).
    """

    alpha: float
    fusion_scale: float = 1.0
    itm_hardness: float = 1.0


@register_task("albef")
class AlbefTask:
    """Owns the online model (maybe DDP-wrapped), its momentum copy, the feature queues and the ALBEF objectives
    (``train.task=albef``, the default under ``albef.enabled``; ITC, ITM and MLM are its own: no ``loss.kind`` loss).

    Args:
        model: the unwrapped online model: a ``DualEncoder`` (ITC + momentum distillation only) or an
            ``AlbefModel`` with a fusion encoder (ITM, MLM).
        train_model: ``model`` or its DDP wrapper (every pass with gradient goes through it).
        config: the run's config (``albef``, ``loss.gather``, ``loss.chunk_size``, ``train.steps`` are read).
        device: where batches go. precision: ``fp32``, ``bf16`` or ``fp16``. attention: SDPA kernel choice.
    """

    def __init__(self, model: nn.Module, train_model: nn.Module, config: Config, device: torch.device,
                 precision: str, attention: str = "auto") -> None:
        self.model, self.train_model, self.config = model, train_model, config
        self.settings = config.albef
        self.device, self.precision, self.attention = device, precision, attention
        self.context = StepContext(device, precision, attention)
        self.momentum = MomentumEncoder(model).to(device)
        self.queue = FeatureQueue(self.settings.queue_size, int(model.embed_dim)).to(device)
        has_fusion = bool(getattr(model, "has_fusion", False))
        self.use_itm = has_fusion and self.settings.itm and self.settings.itm_weight > 0
        self.use_mlm = has_fusion and self.settings.mlm and self.settings.mlm_weight > 0
        self.positives = config.loss.positives
        self.itm_positives = self.positives if self.settings.itm_positives == "loss" else self.settings.itm_positives
        self._fusion_grads = {"text_grad": self.settings.fusion_text_grad,
                              "image_grad": self.settings.fusion_image_grad}
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def from_config(cls, config: Config, model: nn.Module, train_model: nn.Module, device: torch.device) -> AlbefTask:
        """The task of a run (``albef``, ``loss.gather``, ``loss.chunk_size``, ``train.precision``, ``train.attention``,
        ``train.steps`` are read)."""
        return cls(model, train_model, config, device, config.train.precision, config.train.attention)

    # ------------------------------------------------------------------------------------------------ passes
    def encode(self, module: nn.Module, batch: Batch) -> ModelOutput:
        """The features (and token states) of ``batch`` from ``module`` (``model``, ``train_model`` or ``momentum``)
        in the step's precision and attention kernel."""
        return self.context.encode(module, batch)

    def alpha(self, step: int) -> float:
        """The distillation weight at ``step`` (0 when ``albef.distill`` is off)."""
        if not self.settings.distill:
            return 0.0
        return alpha_at(step, self.settings.alpha, self.settings.alpha_warmup_steps)

    def values_at(self, step: int) -> StepValues:
        """The schedules' values at optimizer step ``step``."""
        settings = self.settings
        return StepValues(alpha=self.alpha(step),
                          fusion_scale=linear_warmup(step, 1.0, settings.fusion_warmup_steps),
                          itm_hardness=linear_warmup(step, 1.0, settings.itm_hard_warmup_steps))

    # ------------------------------------------------------------------------------------------------- step
    def forward_backward(self, micro_batches: list[Batch], scale_loss=lambda loss: loss, step: int = 0) -> LossOutput:  # noqa: ANN001
        """All objectives over the step's micro-batches, back-propagated; returns their mean over micro-batches."""
        now = self.values_at(step)
        teachers = [self.encode(self.momentum, batch) for batch in micro_batches]
        image_m = torch.cat([t.image_features for t in teachers]).float()  # (B_rank, D)
        text_m = torch.cat([t.text_features for t in teachers]).float()
        ids = torch.cat([batch.sample_ids for batch in micro_batches])
        groups = step_groups(micro_batches, self.positives)  # (B_rank,) caption hashes / labels, or None
        order = _step_order([len(batch) for batch in micro_batches])
        gathered = self._gather_keys(image_m, text_m, ids, groups, order)
        # loss.gather=none: this rank's batch + the queue as keys (the original ALBEF); otherwise every rank's batch
        batch_keys = (image_m, text_m, ids, groups) if self.config.loss.gather == "none" else gathered
        queue_image, queue_text, queue_ids = self.queue.valid()
        dtype = MATMUL_DTYPES.get(self.precision, torch.float32)  # keys are cast once here, not in every matmul
        keys = (torch.cat([batch_keys[0].to(dtype), queue_image.to(dtype)]),
                torch.cat([batch_keys[1].to(dtype), queue_text.to(dtype)]), torch.cat([batch_keys[2], queue_ids]),
                None if groups is None else torch.cat([batch_keys[3], self.queue.valid_groups()]))
        step_rows = (image_m, text_m, ids, groups)
        if self.settings.batch_keys == "online":
            outputs = self._online_key_steps(micro_batches, teachers, step_rows, keys, order, now, scale_loss)
        else:
            outputs = self._momentum_key_steps(micro_batches, teachers, step_rows, keys, now, scale_loss)
        self._pending = gathered if self.settings.queue else None  # albef.queue=false: the queue stays empty
        extra = {"alpha": now.alpha}
        if self.use_itm or self.use_mlm:
            extra.update(fusion_scale=now.fusion_scale, itm_hardness=now.itm_hardness)
        return _mean_outputs(outputs, extra)

    def _momentum_key_steps(self, micro_batches: list[Batch], teachers: list[ModelOutput], step_rows: tuple,
                            keys: tuple, now: StepValues, scale_loss) -> list[LossOutput]:  # noqa: ANN001
        """``albef.batch_keys=momentum`` (ALBEF): every key is a constant, so each micro-batch's rows are scored
        against the same keys as one big batch's would be, and the micro-batch losses / k simply add up.
        ``step_rows``: (image_m, text_m, ids, groups) of this rank's step."""
        image_m, text_m, ids, groups = step_rows
        outputs, offset = [], 0
        for index, batch in enumerate(micro_batches):
            rows = slice(offset, offset + len(batch))
            offset += len(batch)
            with gradient_sync(self.train_model, enabled=index == len(micro_batches) - 1):
                student = self.encode(self.train_model, batch)
                itc = self._itc(student.image_features, student.text_features, student.logit_scale,
                                (image_m[rows], text_m[rows], ids[rows], None if groups is None else groups[rows]),
                                keys, now.alpha)
                result = _weighted_sum([(self.settings.itc_weight, itc),
                                        *self._fusion_objectives(batch, student, teachers[index], image_m[rows],
                                                                 text_m[rows], now)])
                scale_loss(result.loss / len(micro_batches)).backward()
            outputs.append(result)
        return outputs

    def _online_key_steps(self, micro_batches: list[Batch], teachers: list[ModelOutput], step_rows: tuple,
                          keys_m: tuple, order: torch.Tensor | None, now: StepValues, scale_loss) -> list[LossOutput]:  # noqa: ANN001
        """``albef.batch_keys=online``: at every micro-step, ITC of the whole step's rows against the online features
        of the step's batch (with gradient) and the queue, as the CLIP task does with accumulation (GradCache: the
        other micro-batches' features come from a no-grad pass replayed with the same random state, so the summed
        micro-step gradients equal one big batch's); ITM and MLM per micro-batch, / k. ``keys_m``: the teacher's
        keys [batch ; queue] (the soft targets' columns), their ids and groups."""
        count = len(micro_batches)
        image_m, text_m, ids, groups = step_rows
        cached, rng_states = [], []
        if count > 1:
            with torch.no_grad():
                for batch in micro_batches:
                    rng_states.append(capture_rng(self.device))
                    cached.append(self.encode(self.model, batch))
        # with replayed passes, negatives and masks draw from one stream of their own, after every cached pass
        sampling_rng = capture_rng(self.device) if count > 1 else None
        outputs, offset = [], 0
        for index, batch in enumerate(micro_batches):
            rows = slice(offset, offset + len(batch))
            offset += len(batch)
            with gradient_sync(self.train_model, enabled=index == count - 1):
                if count > 1:
                    restore_rng(rng_states[index])
                student = self.encode(self.train_model, batch)
                if sampling_rng is not None:
                    restore_rng(sampling_rng)
                image, text = student.image_features, student.text_features
                if count > 1:  # the step's rows: this micro-batch's fresh features among the cached ones (B_rank, D)
                    image = splice_features([c.image_features for c in cached], image, index)
                    text = splice_features([c.text_features for c in cached], text, index)
                scale = spread_gradient(student.logit_scale, 1.0 / count)  # enters every micro-step: 1/k each
                batch_image, batch_text = self._online_batch_keys(image, text, order)  # (N, D) with gradient
                online_keys = (torch.cat([batch_image.to(keys_m[0].dtype), keys_m[0][batch_image.shape[0]:]]),
                               torch.cat([batch_text.to(keys_m[1].dtype), keys_m[1][batch_text.shape[0]:]]),
                               *keys_m[2:])
                itc = self._itc(image, text, scale, step_rows, online_keys, now.alpha, teacher_keys=keys_m[:2])
                fusion = self._fusion_objectives(batch, student, teachers[index], image_m[rows], text_m[rows], now)
                others = _weighted_sum(fusion) if fusion else None
                loss = self.settings.itc_weight * itc.loss + (others.loss / count if others is not None else 0.0)
                scale_loss(loss).backward()
                if sampling_rng is not None:
                    sampling_rng = capture_rng(self.device)
            outputs.append(_weighted_sum([(self.settings.itc_weight, itc), *fusion]))
        return outputs

    def _online_batch_keys(self, image: torch.Tensor, text: torch.Tensor,
                           order: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's online features as batch keys, in the teacher's key order: this rank's (``loss.gather=none``)
        or every rank's, gathered with gradient (its backward sums the ranks' gradients, as the CLIP loss's)."""
        if self.config.loss.gather == "none" or distributed.group_rank_and_size()[1] == 1:
            return image, text
        width = image.shape[1]
        both = distributed.all_gather_with_grad(torch.cat([image, text], dim=1))  # (N, 2D), rank major
        if order is not None:
            both = both[order]
        return both[:, :width], both[:, width:]

    def _gather_keys(self, image_m: torch.Tensor, text_m: torch.Tensor, ids: torch.Tensor,
                     groups: torch.Tensor | None, order: torch.Tensor | None) -> tuple:
        """Momentum features of the whole step's batch from every rank: the keys and the enqueue.

        Rows come in the order one process would hold them on the concatenated micro-batches (micro-batch 0 of
        every rank in rank order, then micro-batch 1, ...; ``order``, from :func:`_step_order`), so the queue's
        slots, and which keys a wrap-around overwrites, do not depend on how the global batch is split into ranks
        and micro-batches. Returns (image (N, D), text (N, D), ids (N,), groups (N,) or None for
        ``loss.positives=index``).
        """
        gathered = (distributed.all_gather_tensor(image_m), distributed.all_gather_tensor(text_m),
                    distributed.all_gather_tensor(ids),
                    None if groups is None else distributed.all_gather_tensor(groups))  # rank major: (W * B_rank, ...)
        if order is None:
            return gathered
        return tuple(None if part is None else part[order.to(ids.device)] for part in gathered)

    def _itc(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, rows: tuple, keys: tuple,
             alpha: float, teacher_keys: tuple[torch.Tensor, torch.Tensor] | None = None) -> LossOutput:
        """MoD-ITC of the rows ``image``, ``text`` (R, D); ``rows``: their (image_m, text_m, ids, groups);
        ``keys``: (image (K, D), text (K, D), ids (K,), groups (K,) or None) of the batch and queue."""
        image_m, text_m, ids, groups = rows
        with self.context.autocast():
            return momentum_distilled_itc(image, text, image_m, text_m, keys[0], keys[1], ids, keys[2], logit_scale,
                                          alpha, chunk_size=self.config.loss.chunk_size, groups=groups,
                                          key_groups=keys[3], teacher_keys=teacher_keys)

    def _fusion_objectives(self, batch: Batch, student: ModelOutput, teacher: ModelOutput, image_m: torch.Tensor,
                           text_m: torch.Tensor, now: StepValues) -> list[tuple[float, LossOutput]]:
        """(weight, loss) of ITM and MLM on this micro-batch, for those switched on (weights ramped by
        ``albef.fusion_warmup_steps``)."""
        results = []
        if self.use_itm:
            itm = self.itm(batch, student, image_m, text_m, now.itm_hardness)
            results.append((self.settings.itm_weight * now.fusion_scale, itm))
        if self.use_mlm:
            results.append((self.settings.mlm_weight * now.fusion_scale, self._mlm(batch, student, teacher, now.alpha)))
        return results

    def itm(self, batch: Batch, student: ModelOutput, image_m: torch.Tensor, text_m: torch.Tensor,
            hardness: float = 1.0) -> LossOutput:
        """ITM on the B positive pairs, each image with a hard negative text and each text with a hard negative
        image, drawn with probability softmax(hardness * similarity) among the candidates that are not positives
        (equal sample ids, and with ``albef.itm_positives`` (or ``loss.positives``) ``caption|label`` equal groups
        too); hardness 0: uniformly. ``student``: the micro-batch's online output (features (B, D), image tokens,
        text hidden states); ``image_m``, ``text_m``: its momentum features (B, D). The fused pairs go through
        ``train_model(task="itm", ...)``."""
        image_tokens, text_hidden, text_mask = student.image_tokens, student.text_hidden, batch.text_mask
        candidate_ids, candidate_image_m, candidate_text_m = batch.sample_ids, image_m, text_m
        groups = candidate_groups = batch_groups(batch, self.itm_positives)
        if self.settings.itm_global_negatives:  # candidates from the whole batch of every rank
            image_tokens = distributed.all_gather_with_grad(image_tokens)
            text_hidden = distributed.all_gather_with_grad(text_hidden)
            text_mask = distributed.all_gather_tensor(text_mask)
            candidate_ids = distributed.all_gather_tensor(batch.sample_ids)
            candidate_image_m = distributed.all_gather_tensor(image_m)
            candidate_text_m = distributed.all_gather_tensor(text_m)
            if groups is not None:
                candidate_groups = distributed.all_gather_tensor(groups)
        with torch.no_grad():
            scale = student.logit_scale.detach().float() * hardness
            sim_i2t = scale * student.image_features.detach().float() @ candidate_text_m.T  # (B, C)
            sim_t2i = scale * student.text_features.detach().float() @ candidate_image_m.T  # (B, C)
            positives = batch.sample_ids[:, None] == candidate_ids[None, :]
            if groups is not None:
                positives |= (groups[:, None] == candidate_groups[None, :]) & (candidate_groups != -1)[None, :]
            negative_text, text_ok = sample_hard_negatives(sim_i2t, positives)
            negative_image, image_ok = sample_hard_negatives(sim_t2i, positives)
        own_tokens, own_hidden, own_mask = student.image_tokens, student.text_hidden, batch.text_mask
        fused_tokens = torch.cat([own_tokens, own_tokens, image_tokens[negative_image]])  # (3B, N, C)
        fused_hidden = torch.cat([own_hidden, text_hidden[negative_text], own_hidden])  # (3B, L, H)
        fused_mask = torch.cat([own_mask, text_mask[negative_text], own_mask])
        with self.context.passes():
            logits = self.train_model(task="itm", image_tokens=fused_tokens, text_hidden=fused_hidden,
                                      text_mask=fused_mask, **self._fusion_grads)  # (3B, 2)
        ignore = torch.full_like(batch.sample_ids, -100)
        labels = torch.cat([torch.ones_like(batch.sample_ids), torch.where(text_ok, 0, ignore),
                            torch.where(image_ok, 0, ignore)])
        return itm_loss(logits, labels)

    def _mlm(self, batch: Batch, student: ModelOutput, teacher: ModelOutput, alpha: float) -> LossOutput:
        """Masked language modelling from the fused states; the momentum model's predictions are soft labels."""
        model = self.model
        masked_ids, positions, labels = mask_tokens(
            batch.text_ids, batch.text_mask, vocab_size=model.vocab_size, mask_token_id=model.mask_token_id,
            special_ids=model.special_token_ids, probability=self.settings.mlm_probability)
        with self.context.passes():
            logits = self.train_model(task="mlm", text_ids=masked_ids, text_mask=batch.text_mask,
                                      image_tokens=student.image_tokens, positions=positions,
                                      **self._fusion_grads)  # (M, V)
            soft = None
            if alpha > 0:
                soft = self.momentum(task="mlm", text_ids=masked_ids, text_mask=batch.text_mask,
                                     image_tokens=teacher.image_tokens, positions=positions)
        return mlm_loss(logits, labels, soft, alpha)

    # ------------------------------------------------------------------------------------------ post-step hook
    @torch.no_grad()
    def after_optimizer_step(self, step: int = 0) -> None:
        """Once per optimizer step: clamp the temperature, EMA-update the momentum model, enqueue the keys."""
        clamp_logit_scale(self.model)
        momentum = momentum_at(step, self.settings.momentum, self.config.train.steps, self.settings.momentum_schedule)
        self.momentum.update(self.model, momentum)
        if self._pending is not None:
            self.queue.enqueue(*self._pending)
            self._pending = None

    @property
    def pending_keys(self) -> tuple | None:
        """The gathered momentum keys (image, text, ids, groups) the next :meth:`after_optimizer_step` enqueues
        (None: nothing pending)."""
        return self._pending

    def discard_step(self) -> None:
        """A skipped (non-finite) step changes nothing: its momentum features are not enqueued."""
        self._pending = None

    def parameters(self) -> Iterator[nn.Parameter]:
        """The online model's trainable parameters (the momentum copy is frozen)."""
        return trainable_parameters(self.model)

    def state_dict(self) -> dict:
        """Momentum weights and queues (tensors only: checkpoints load them with ``weights_only=True``)."""
        return {"momentum": self.momentum.state_dict(), "queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the momentum weights and queues of :meth:`state_dict`."""
        self.momentum.load_state_dict(state["momentum"])
        self.queue.load_state_dict(state["queue"])

    def check_state(self, state: dict, source: Path) -> None:
        """A checkpoint without a momentum copy, or with queues of another ``albef.queue_size``, cannot resume."""
        if not state:
            raise ConfigError(f"{source} holds no momentum encoder or feature queues (written by a run without "
                              "albef.enabled?): an ALBEF run cannot resume from it")
        if "queue" in state:
            saved = int(state["queue"]["sample_ids"].shape[0])
            if saved != self.settings.queue_size:
                raise ConfigError(f"{source} holds feature queues of {saved} entries but albef.queue_size is "
                                  f"{self.settings.queue_size}: set albef.queue_size={saved} to resume from it")

    def shard(self, shard_module: Callable[[nn.Module], nn.Module]) -> None:
        """FSDP: the momentum copy sharded as the online model is, so the EMA update pairs shards of equal layout."""
        shard_module(self.momentum.model)
        self.momentum.reindex()


def _step_order(sizes: list[int]) -> torch.Tensor | None:
    """Indices that reorder the rank-major rows of a gather micro-batch major (see :func:`_micro_batch_major`), or
    None when they already are (one rank, or one micro-batch). ``sizes``: this step's micro-batch sizes, the same on
    every rank (the gathers need equal row counts anyway)."""
    world = distributed.group_rank_and_size()[1]
    if world == 1 or len(sizes) == 1:
        return None
    return _micro_batch_major(sizes, world)


def _micro_batch_major(sizes: list[int], world: int) -> torch.Tensor:
    """Indices that reorder rank-major rows (rank r's micro-batches 0..k-1, then rank r+1's) micro-batch major
    (micro-batch 0 of ranks 0..W-1, then micro-batch 1 of ranks 0..W-1, ...); every rank has micro-batches of
    ``sizes`` rows."""
    per_rank, starts = sum(sizes), [sum(sizes[:k]) for k in range(len(sizes))]
    return torch.cat([torch.arange(rank * per_rank + start, rank * per_rank + start + size)
                      for start, size in zip(starts, sizes, strict=True) for rank in range(world)])


def _weighted_sum(results: list[tuple[float, LossOutput]]) -> LossOutput:
    loss = sum(weight * result.loss for weight, result in results)
    parts, metrics = {}, {}
    for _, result in results:
        parts.update(result.parts)
        metrics.update(result.metrics)
    return LossOutput(loss, parts, metrics)


def _mean_outputs(outputs: list[LossOutput], extra_metrics: dict[str, float]) -> LossOutput:
    """The mean over micro-batches of the loss (detached), its parts and metrics."""
    count = len(outputs)
    loss = sum(o.loss.detach() for o in outputs) / count
    parts = {name: sum(o.parts[name] for o in outputs) / count for name in outputs[0].parts}
    metrics = {name: sum(o.metrics[name] for o in outputs) / count for name in outputs[0].metrics}
    return LossOutput(loss, parts, {**metrics, **extra_metrics})
