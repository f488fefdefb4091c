"""The distillation objective: one step's loss from one forward of each model.

A :class:`DistillObjective` owns named loss terms (:mod:`.terms`, a registry: logits, hidden, attention, relations,
weights, mmd, nst, token_attention, activation_boundary, fsp, rkd, and any term added with
:func:`register_loss_term`), their learnable parts (hidden-state channel projections, weight maps) and the loss
balancer; its config is :mod:`.loss_config` (``loss.terms``). Each term compares a trained ``source`` role with a
``target`` role (:mod:`.roles`) and says which features it needs from each; the features are captured during the
single forward of each model (:func:`model_features`), and the logit term works from final hidden states and the
output-head weight so that no tokens x vocabulary logits exist.

:class:`DistillationModule` bundles the trainable models (the student, and the peers of a mutual run), the
objectives' learnable parts and any training-mode parts (early exits, network augmentation) into the one module the
trainer hands to accelerate: its ``forward`` runs them and the losses, so DDP / FSDP2 / DeepSpeed see every
trainable parameter inside the wrapped forward. The names of the split modules are re-exported here.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ConfigError
from ..prune.prune_map import PruneMap
from .features import (
    STUDENT,
    TEACHER,
    CachedTeacher,
    CaptureRequest,
    EnsembleFeatures,
    EnsembleTeacher,
    ModelFeatures,
    model_features,
    unwrap_module,
)
from .loss_config import (
    LOGITS,
    TERM_SETTINGS,
    AttentionLossSettings,
    DistillLossConfig,
    HiddenLossSettings,
    LayerPairing,
    LogitLossSettings,
    RelationLossSettings,
    TermSettings,
    check_cache_compatible,
    check_term_roles,
    feature_terms,
)
from .terms import (
    LOSS_TERMS,
    ActivationBoundarySettings,
    FeatureMMDSettings,
    FlowSettings,
    LossTerm,
    NSTSettings,
    ObjectiveContext,
    RelationalKDSettings,
    TokenAttentionSettings,
    WeightMatchSettings,
    register_loss_term,
)


# ---------------------------------------------------------------------------------------------- objective


class DistillObjective(nn.Module):
    """Named loss terms plus the balancer; ``forward(features_by_role, input_ids) -> (total, components)``.

    ``components`` holds each term's unweighted value (detached) under ``loss/<name>`` and the weight
    the balancer applied to it under ``weight/<name>``. Learnable parts (projections) and balancer buffers are submodules, so they
    are in ``state_dict()`` and ``parameters()``.
    """

    def __init__(self, cfg: DistillLossConfig, *, teacher: nn.Module, student: nn.Module, prune_map: PruneMap | None = None,
                 vocab_size: int | None = None, roles: dict[str, nn.Module] | None = None,
                 trained_roles: dict[str, nn.Module] | None = None):
        """``roles``: further frozen models by role name; ``trained_roles``: further trained ones (their features are
        detached where a term targets them)."""
        super().__init__()
        from .balance import LossBalancer

        self.config = cfg
        self.vocab_size = vocab_size
        models = {STUDENT: student, TEACHER: teacher, **(roles or {}), **(trained_roles or {})}
        self.trained_roles = [STUDENT, *(trained_roles or {})]
        """The roles whose models train (a term targeting one of them reads its features detached)."""
        check_term_roles(cfg, roles=list(models), trainable=self.trained_roles)
        terms = {}
        for name, settings in cfg.terms.items():
            if settings.weight <= 0:
                continue
            if settings.term not in LOSS_TERMS:
                raise ConfigError(f"{settings.key}: no loss term of that name is registered (known: {', '.join(sorted(LOSS_TERMS))})")
            related = (settings.source, settings.target) == (STUDENT, TEACHER)
            ctx = ObjectiveContext(models=models, prune_map=prune_map if related else None, settings=settings, vocab_size=vocab_size)
            terms[name] = LOSS_TERMS[settings.term](ctx)
        self.terms = nn.ModuleDict(terms)
        self.balancer = LossBalancer(cfg.weights(), mode=cfg.balance, anchor=LOGITS)

    def requests(self) -> dict[str, CaptureRequest]:
        """Merged feature requests of all terms, by role."""
        out: dict[str, CaptureRequest] = {}
        for term in self.terms.values():
            for role, req in term.requests().items():
                out[role] = out.get(role, CaptureRequest()).merge(req)
        return out

    def request_for(self, role: str) -> CaptureRequest:
        return self.requests().get(role, CaptureRequest())

    def forward(self, features: dict[str, ModelFeatures], input_ids: torch.Tensor,
                target_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``target_mask`` [batch, seq] (bool): the logit term counts only positions predicting a True token
        (then the logit term must be the only term)."""
        if target_mask is None:
            components = {name: term(self._term_features(term, features), input_ids) for name, term in self.terms.items()}
        else:
            if list(self.terms) != ["logits"]:
                raise ValueError(f"target_mask masks the logit term only, but the objective also has {sorted(set(self.terms) - {'logits'})}")
            components = {"logits": self.terms["logits"](features, input_ids, target_mask)}
        total, logged = self.balancer(components)
        out = {f"loss/{k}": v.detach().float() for k, v in components.items()}
        for k, v in logged.items():
            if k.endswith("/weight"):
                out[f"weight/{k[: -len('/weight')]}"] = torch.as_tensor(v, dtype=torch.float32)
        return total, out

    def _term_features(self, term: LossTerm, features: dict[str, ModelFeatures]) -> dict[str, ModelFeatures]:
        """``features`` with the term's target detached when that role trains, unless the term asks otherwise."""
        if term.target not in self.trained_roles or not term.detach_target:
            return features
        return {**features, term.target: features[term.target].detached()}


class DistillationModule(nn.Module):
    """The trainable bundle handed to accelerate: the student, its objective's learnable parts, and any peers.

    ``forward(input_ids, teacher_features)`` runs every trainable model once and returns a dict with
    ``loss`` (the sum of the models' balanced totals, differentiable) and ``components`` (detached per-term
    values). Peers (deep mutual learning, :mod:`minidistill.distill.mutual`) each have their own objective
    against the teacher, scaled by ``teacher_weight``, plus ``mutual_weight`` x ``mutual`` to the other peers;
    the student is peer 0 and logs its terms under their usual names, peer ``i`` under ``peer<i>/``. With
    ``peer_names`` the peers are instead trained roles of the student's one objective (``roles.<name>.trainable``):
    each model runs once and the objective's terms, by role, give the loss. Early-exit
    heads (``exits``, :mod:`minidistill.distill.exits`) add their loss against the student's own final layer; with
    ``netaug`` (:mod:`minidistill.distill.netaug`) the student also runs inside the wider model (``netaug_ratio``).
    """

    def __init__(self, student: nn.Module, objective: DistillObjective, *, peers: list[nn.Module] | None = None,
                 peer_names: list[str] | None = None,
                 peer_objectives: list[DistillObjective] | None = None, mutual: nn.Module | None = None,
                 mutual_weight: float = 1.0, teacher_weight: float = 1.0, exits: nn.Module | None = None,
                 netaug: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.objective = objective
        peers, peer_objectives = list(peers or []), list(peer_objectives or [])
        self.peer_names = list(peer_names or [])
        """Role names of the peers when they are trained roles of the one objective (``roles.<name>.trainable``);
        empty for mutual learning's peers, which each have their own objective plus the mutual loss."""
        if self.peer_names:
            if len(self.peer_names) != len(peers) or peer_objectives or mutual is not None:
                raise ValueError("named trained roles share the student's objective: one name per peer, no mutual loss")
        elif len(peers) != len(peer_objectives) or (peers and mutual is None):
            raise ValueError("each peer needs its own objective, and peers need a mutual loss")
        self.peers = nn.ModuleList(peers)
        self.peer_objectives = nn.ModuleList(peer_objectives)
        self.mutual = mutual
        self.mutual_weight, self.teacher_weight = float(mutual_weight), float(teacher_weight)
        if exits is not None and peers:
            raise ValueError("early exits train one student; they do not combine with peers")
        self.exits = exits
        """:class:`~minidistill.distill.exits.ExitHeads` on the student's intermediate layers (None: none)."""
        if netaug is not None and (peers or "logits" not in objective.terms):
            raise ValueError("netaug trains one student with a logit term")
        self.netaug = netaug
        """:class:`~minidistill.distill.netaug.AugmentedWidth`: the wider model's extra neurons (None: none)."""

    @property
    def config(self):
        """The student's config (accelerate and sharding helpers look for ``.config``)."""
        return self.student.config

    def trainable_models(self) -> list[nn.Module]:
        """The student, then each peer."""
        return [self.student, *self.peers]

    def objectives(self) -> list[DistillObjective]:
        """Each trainable model's objective against the teacher, in :meth:`trainable_models` order."""
        return [self.objective, *self.peer_objectives]

    def generate_student(self, prefix: torch.Tensor, uniforms: torch.Tensor, *, temperature: float,
                         vocab_size: int | None = None) -> torch.Tensor:
        """The student's sampled continuations of ``prefix`` (:func:`~minidistill.distill.on_policy.generate_continuations`);
        a method of the prepared module so that FSDP2 gathers the root's weights around it (``register_fsdp_forward_method``)."""
        from .on_policy import generate_continuations

        return generate_continuations(self.student, prefix, uniforms, temperature=temperature, vocab_size=vocab_size)

    @torch.no_grad()
    def heldout(self, input_ids: torch.Tensor, teacher_features: ModelFeatures, *, chunk_tokens: int, peer: int = 0,
                copy_head: bool = False) -> dict[str, torch.Tensor | dict[int, torch.Tensor]]:
        """Held-out sums ``[nll, tokens, top-1 agreements with the teacher]`` of trainable model ``peer`` (0: the
        student; :func:`minidistill.training.evaluation.heldout_stats`) under ``stats``, and with early exits each exit's
        under ``exit_stats``. One forward of that model; ``copy_head``: clone its head weight before the head runs (a
        sharded model frees its gathered weights after each module). A method of the prepared module: FSDP2 gathers
        the root's weights around it (``register_fsdp_forward_method``), ZeRO-3 each module's as it runs."""
        from ..training.evaluation import heldout_stats

        exits = self.exits if peer == 0 else None
        request = CaptureRequest(hidden=set(exits.layers)) if exits is not None else CaptureRequest()
        features = model_features(self.trainable_models()[peer], input_ids, request, copy_head=copy_head)
        vocab_size = self.objective.vocab_size
        out: dict[str, torch.Tensor | dict[int, torch.Tensor]] = {
            "stats": heldout_stats(features, input_ids, chunk_tokens=chunk_tokens, reference=teacher_features, vocab_size=vocab_size)}
        if exits is not None:
            out["exit_stats"] = {
                layer: heldout_stats(dataclasses.replace(features, final_hidden=exits.exit_hidden(layer, features.hidden[layer])),
                                     input_ids, chunk_tokens=chunk_tokens, reference=teacher_features, vocab_size=vocab_size)
                for layer in exits.layers
            }
        return out

    def forward(self, input_ids: torch.Tensor, teacher_features: ModelFeatures | None, *,
                target_mask: torch.Tensor | None = None, netaug_ratio: float | None = None,
                role_features: dict[str, ModelFeatures] | None = None) -> dict:
        """One training micro-batch: ``{"loss", "components"}`` (``target_mask``: see :meth:`DistillObjective.forward`;
        ``role_features``: the features of the further frozen roles, by name; held-out figures: :meth:`heldout`)."""
        exit_request = CaptureRequest(hidden=set(self.exits.layers)) if self.exits is not None else CaptureRequest()
        if self.peer_names:
            features = {name: model_features(model, input_ids, self.objective.request_for(name))
                        for name, model in zip([STUDENT, *self.peer_names], self.trainable_models())}
            total, components = self.objective({**features, TEACHER: teacher_features, **(role_features or {})}, input_ids)
            return {"loss": total, "components": components}
        if not self.peers:
            student_features = model_features(self.student, input_ids, self.objective.request_for(STUDENT).merge(exit_request))
            features = {STUDENT: student_features, TEACHER: teacher_features, **(role_features or {})}
            total, components = self.objective(features, input_ids, target_mask)
            if self.exits is not None:
                exit_total, exit_components = self.exits(student_features.hidden, student_features.final_hidden,
                                                         student_features.head_weight, student_features.head_bias)
                total = total + exit_total
                components.update(exit_components)
            if self.netaug is not None and netaug_ratio is not None:
                with self.netaug.active(self.student, netaug_ratio):
                    wide = model_features(self.student, input_ids, CaptureRequest())
                wide_loss = self.objective.terms["logits"]({STUDENT: wide, TEACHER: teacher_features}, input_ids)
                total = total + self.netaug.alpha * wide_loss
                components["loss/netaug"] = wide_loss.detach().float()
            return {"loss": total, "components": components}
        return self._mutual_forward(input_ids, teacher_features, target_mask)

    def _mutual_forward(self, input_ids: torch.Tensor, teacher_features: ModelFeatures | None,
                        target_mask: torch.Tensor | None) -> dict:
        objectives = self.objectives()
        feats = [model_features(m, input_ids, obj.request_for(STUDENT)) for m, obj in zip(self.trainable_models(), objectives)]
        flat = [(f.final_hidden[:, :-1].reshape(-1, f.final_hidden.shape[-1]), f.head_weight, f.head_bias) for f in feats]
        labels = input_ids[:, 1:].reshape(-1)
        total, components = None, {}
        for i, (f, obj) in enumerate(zip(feats, objectives)):
            prefix = "" if i == 0 else f"peer{i}/"
            loss = None
            if self.teacher_weight > 0:
                t_loss, comp = obj({STUDENT: f, TEACHER: teacher_features}, input_ids, target_mask)
                loss = self.teacher_weight * t_loss
                components.update({prefix + k: v for k, v in comp.items()})
            h, w, b = flat[i]
            m_loss = self.mutual(h, w, [o for j, o in enumerate(flat) if j != i], labels, head_bias=b)
            components[prefix + "loss/mutual"] = m_loss.detach().float()
            loss = self.mutual_weight * m_loss if loss is None else loss + self.mutual_weight * m_loss
            total = loss if total is None else total + loss
        return {"loss": total, "components": components}


@torch.no_grad()
def teacher_features(teacher: nn.Module, input_ids: torch.Tensor, objective: DistillObjective, *,
                     copy_head: bool = False, role: str = TEACHER) -> ModelFeatures | EnsembleFeatures:
    """A frozen role's features for one micro-batch (one forward of it, or of each ensemble member; no gradients);
    ``role`` names which of the objective's roles ``teacher`` is."""
    inner = unwrap_module(teacher)
    if isinstance(inner, EnsembleTeacher):
        return EnsembleFeatures([model_features(m, input_ids, objective.request_for(role), copy_head=copy_head)
                                 for m in inner.members])
    return model_features(teacher, input_ids, objective.request_for(role), copy_head=copy_head)


__all__ = [
    "LOGITS",
    "TERM_SETTINGS",
    "TermSettings",
    "check_term_roles",
    "feature_terms",
    "ActivationBoundarySettings",
    "AttentionLossSettings",
    "FeatureMMDSettings",
    "FlowSettings",
    "NSTSettings",
    "RelationalKDSettings",
    "TokenAttentionSettings",
    "WeightMatchSettings",
    "CachedTeacher",
    "CaptureRequest",
    "check_cache_compatible",
    "DistillLossConfig",
    "DistillObjective",
    "DistillationModule",
    "EnsembleFeatures",
    "EnsembleTeacher",
    "HiddenLossSettings",
    "LOSS_TERMS",
    "LayerPairing",
    "LogitLossSettings",
    "LossTerm",
    "ModelFeatures",
    "ObjectiveContext",
    "RelationLossSettings",
    "model_features",
    "register_loss_term",
    "teacher_features",
]
