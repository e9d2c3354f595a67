"""The T-step student unroll and its meta-gradients (SPEC.md §4, §5, §11).

One distillation iteration differentiates the trajectory-matching loss

    L = sum_m ||theta^m_T - theta*_m||^2 / D_m      (or the merged form)
    theta_{i+1} = theta_i - eta * grad_theta l_i(theta_i; batch i)

with respect to the synthetic images ``x``, texts ``y``, the similarity parameters and the student
learning rates ``eta``. Two meta-gradients:

* ``exact``: reverse mode through the whole unroll (``create_graph`` per step, optional per-step
  gradient checkpointing), with a real autograd path to ``eta``.
* ``tesla``: the paper's two passes. Pass 1 runs the unroll without a graph and keeps
  ``theta_i`` and ``G = sum_i g_i``; pass 2 differentiates
  ``psi_i = sum_m w_m <c_m, grad_theta l_i(theta_i)>`` per step (first-order exact, as the
  reference), with ``c_m = eta_m (Delta_m + eta_m G_m)`` from one fused pass
  (:func:`repblend_fast.ops.trajectory_terms`).

Students: RepBlend trains two projection heads on frozen-encoder features, so with
``share_encoder=True`` the encoder runs once per iteration on the touched images and the whole unroll
lives in feature space; the cotangents of all steps are summed and pulled back through the encoder
with one VJP (blending is linear, autograd's gather backward is exactly ``lam g + (1-lam) P^T g``).
``share_encoder=False`` re-encodes every step's batch (twice in TESLA), as the authors' code does.
LoRS / MTT-VL train the image encoder itself (its parameters are the image-side flat vector).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from repblend_fast.models.flat import FlatSpec, functional_forward
from repblend_fast.models.heads import HeadSpec, head_forward
from repblend_fast.ops import blend_pairs, contrastive_loss, trajectory_distance, trajectory_terms

MetaGrad = Literal["exact", "tesla"]


@dataclass
class StepPlan:
    """The random draws of one iteration (everything the unroll needs besides tensors).

    batches: ``[T, B]`` long, indices into the N synthetic pairs.
    lams: ``[T]`` blending coefficients (1.0 = no blending).
    perms: ``[T, B]`` long, the within-batch permutation of each step.
    """

    batches: torch.Tensor
    lams: torch.Tensor
    perms: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.batches.shape[0])


@dataclass
class UnrollResult:
    """Losses and meta-gradients of one trajectory.

    grads: ``{"x": [N,...] or None, "y": [N, d_t], "eta_img": [], "eta_txt": [],
    "sim.<name>": ...}`` (full-size, zeros where untouched).
    """

    loss: torch.Tensor
    loss_img: torch.Tensor
    loss_txt: torch.Tensor
    grads: dict[str, torch.Tensor | None]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class UnrollSettings:
    """How one iteration is unrolled and differentiated (see :class:`repblend_fast.DistillConfig`)."""

    method: Literal["repblend", "lors"] = "repblend"
    meta_grad: MetaGrad = "exact"
    loss: str = "wbce"
    eps: float = 1e-6
    logit_scale: float = 1 / 0.07
    merge_loss: bool = False
    blend_target: bool = False
    share_encoder: bool = True
    checkpoint_steps: bool = False
    parity_eta_grad: bool = False
    encoder_autocast: torch.dtype | None = None


class Unroller:
    """Runs the unroll of one trajectory and returns its meta-gradients.

    Args:
        settings: the unroll options.
        encoder: the image encoder ``f`` (frozen for RepBlend, the image student for LoRS), mapping
            images ``[B, 3, H, W]`` to features ``[B, d_f]``.
        img_spec: ``HeadSpec`` of the image head (RepBlend) or ``FlatSpec`` of the encoder (LoRS).
        txt_spec: ``HeadSpec`` of the text head.
        similarity: a similarity generator with ``params()`` and ``block(indices)``, or ``None``
            for identity targets.
    """

    def __init__(
        self,
        settings: UnrollSettings,
        encoder: nn.Module,
        img_spec: HeadSpec | FlatSpec,
        txt_spec: HeadSpec,
        similarity=None,
    ):
        self.s = settings
        self.encoder = encoder
        self.img_spec = img_spec
        self.txt_spec = txt_spec
        self.similarity = similarity
        if settings.method == "lors" and not isinstance(img_spec, FlatSpec):
            raise ValueError("method='lors' needs img_spec to be the encoder's FlatSpec")
        if settings.method == "repblend" and not isinstance(img_spec, HeadSpec):
            raise ValueError("method='repblend' needs img_spec to be the image head's HeadSpec")

    # ----------------------------------------------------------------- pieces
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-encoder features ``[B, d_f]`` in the images' dtype (autocast when configured)."""
        ac = self.s.encoder_autocast
        ctx = (
            torch.autocast(images.device.type, dtype=ac)
            if ac is not None and images.device.type == "cuda"
            else nullcontext()
        )
        with ctx:
            out = self.encoder(images)
        return out.to(images.dtype)

    def target_block(self, idx: torch.Tensor, sim_params, dtype, perm=None, lam=None):
        """``S[I, I]`` ``[B, B]`` (identity without a similarity generator), optionally blended."""
        if self.similarity is None:
            return torch.eye(idx.shape[-1], dtype=dtype, device=idx.device)
        s = self.similarity.block(idx, sim_params)
        if self.s.blend_target and perm is not None:
            sp = s[perm][:, perm]
            s = lam * s + (1 - lam) * sp
        return s

    def step_loss(self, th_img, th_txt, img_in, y_b, s_blk, perm, lam):
        """Loss ``l_i`` of one step. ``img_in``: features ``[B, d_f]`` (RepBlend) or images (LoRS)."""
        if self.s.method == "repblend":
            if perm is not None:
                img_in, y_b = blend_pairs(img_in, y_b, perm, lam)
            e_img = head_forward(th_img, img_in, self.img_spec)
        else:
            e_img = functional_forward(self.encoder, self.img_spec, th_img, img_in)
        e_txt = head_forward(th_txt, y_b, self.txt_spec)
        return contrastive_loss(
            e_img, e_txt, s_blk, logit_scale=self.s.logit_scale, loss=self.s.loss, eps=self.s.eps
        )

    def _step_grads(self, th_img, th_txt, img_in, y_b, s_blk, perm, lam, create_graph: bool):
        if not th_img.requires_grad:
            th_img = th_img.detach().requires_grad_(True)
        if not th_txt.requires_grad:
            th_txt = th_txt.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.step_loss(th_img, th_txt, img_in, y_b, s_blk, perm, lam)
            g_img, g_txt = torch.autograd.grad(loss, (th_img, th_txt), create_graph=create_graph)
        return loss, g_img, g_txt

    def _weights(self, d_img: torch.Tensor, d_txt: torch.Tensor):
        if self.s.merge_loss:
            w = 1.0 / (d_img + d_txt)
            return w, w
        return 1.0 / d_img, 1.0 / d_txt

    # ----------------------------------------------------------------- entry point
    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        sim_params: dict[str, torch.Tensor],
        eta_img: torch.Tensor,
        eta_txt: torch.Tensor,
        start: tuple[torch.Tensor, torch.Tensor],
        target: tuple[torch.Tensor, torch.Tensor],
        plan: StepPlan,
    ) -> UnrollResult:
        """Unroll one trajectory and return its losses and meta-gradients.

        Args:
            x: synthetic images ``[N, 3, H, W]`` (a leaf; its gradient is returned, not accumulated).
            y: synthetic texts ``[N, d_t]``.
            sim_params: the similarity generator's leaf tensors (may be empty).
            eta_img, eta_txt: 0-d learnable student learning rates.
            start, target: ``(theta_img, theta_txt)`` at the start and target epochs (flat, 1-D).
            plan: batches, blending coefficients and permutations of the T steps.
        """
        if self.s.meta_grad == "exact":
            return self._run_exact(x, y, sim_params, eta_img, eta_txt, start, target, plan)
        if self.s.meta_grad == "tesla":
            return self._run_tesla(x, y, sim_params, eta_img, eta_txt, start, target, plan)
        raise ValueError(f"meta_grad must be 'exact' or 'tesla', got {self.s.meta_grad!r}")

    # ----------------------------------------------------------------- helpers
    def _leaves(self, x, y, sim_params, eta_img, eta_txt):
        xl = x.detach().requires_grad_(True)
        yl = y.detach().requires_grad_(True)
        sl = {k: v.detach().requires_grad_(True) for k, v in sim_params.items()}
        el = eta_img.detach().requires_grad_(True)
        tl = eta_txt.detach().requires_grad_(True)
        return xl, yl, sl, el, tl

    def _feature_source(self, xl: torch.Tensor, plan: StepPlan, with_graph: bool):
        """Features for each step: shared (one encoder pass on touched images) or per step."""
        if self.s.method != "repblend":
            return None, None, None
        if not self.s.share_encoder:
            return None, None, None
        touched, inverse = torch.unique(plan.batches, return_inverse=True)
        ctx = torch.enable_grad() if with_graph else torch.no_grad()
        with ctx:
            feats = self.encode(xl[touched])
        return touched, inverse, feats

    def _img_input(self, i, xl, plan, inverse, feats_leaf, no_grad_encode: bool):
        idx = plan.batches[i]
        if self.s.method == "lors":
            return xl[idx]
        if feats_leaf is not None:
            return feats_leaf[inverse[i]]
        if no_grad_encode:
            with torch.no_grad():
                return self.encode(xl[idx])
        return self.encode(xl[idx])

    def _blend_args(self, i, plan):
        lam = plan.lams[i]
        if self.s.method != "repblend" or float(lam) == 1.0:
            return None, None
        return plan.perms[i], lam

    # ----------------------------------------------------------------- exact
    def _run_exact(self, x, y, sim_params, eta_img, eta_txt, start, target, plan):
        xl, yl, sl, el, tl = self._leaves(x, y, sim_params, eta_img, eta_txt)
        touched, inverse, feats = self._feature_source(xl, plan, with_graph=True)
        th_img, th_txt = start[0].detach(), start[1].detach()
        with torch.enable_grad():
            for i in range(plan.steps):
                idx = plan.batches[i]
                perm, lam = self._blend_args(i, plan)
                img_in = self._img_input(i, xl, plan, inverse, feats, no_grad_encode=False)
                s_blk = self.target_block(idx, sl, y.dtype, perm, lam)

                def step(a, b, img_in, y_b, s_blk, e1, e2, perm=perm, lam=lam):
                    _, g1, g2 = self._step_grads(a, b, img_in, y_b, s_blk, perm, lam, True)
                    return a - e1 * g1, b - e2 * g2

                args = (th_img, th_txt, img_in, yl[idx], s_blk, el, tl)
                if self.s.checkpoint_steps:
                    th_img, th_txt = checkpoint(step, *args, use_reentrant=False)
                else:
                    th_img, th_txt = step(*args)
            loss_img = trajectory_distance(th_img, start[0], target[0])
            loss_txt = trajectory_distance(th_txt, start[1], target[1])
            if self.s.merge_loss:
                num = (th_img - target[0]).pow(2).sum() + (th_txt - target[1]).pow(2).sum()
                den = (start[0] - target[0]).pow(2).sum() + (start[1] - target[1]).pow(2).sum()
                loss = num / den
            else:
                loss = loss_img + loss_txt
            inputs = [xl, yl, el, tl, *sl.values()]
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        out = self._pack(grads[0], grads[1], grads[2], grads[3], dict(zip(sl, grads[4:])), x, y, sl)
        return UnrollResult(loss.detach(), loss_img.detach(), loss_txt.detach(), out)

    # ----------------------------------------------------------------- tesla
    def _run_tesla(self, x, y, sim_params, eta_img, eta_txt, start, target, plan):
        xl, yl, sl, el, tl = self._leaves(x, y, sim_params, eta_img, eta_txt)
        e1, e2 = eta_img.detach(), eta_txt.detach()
        # Pass 1: the unroll without a graph, keeping theta_i and G = sum_i g_i.
        touched, inverse, feats = self._feature_source(xl, plan, with_graph=False)
        th_img, th_txt = start[0].detach(), start[1].detach()
        thetas = []
        g_sum_img = torch.zeros_like(th_img)
        g_sum_txt = torch.zeros_like(th_txt)
        with torch.no_grad():
            sl_c = {k: v.detach() for k, v in sl.items()}
            for i in range(plan.steps):
                idx = plan.batches[i]
                perm, lam = self._blend_args(i, plan)
                img_in = self._img_input(i, xl, plan, inverse, feats, no_grad_encode=True)
                s_blk = self.target_block(idx, sl_c, y.dtype, perm, lam)
                thetas.append((th_img, th_txt))
                _, g1, g2 = self._step_grads(
                    th_img, th_txt, img_in.detach(), y[idx].detach(), s_blk, perm, lam, False
                )
                g_sum_img += g1
                g_sum_txt += g2
                th_img = th_img - e1 * g1
                th_txt = th_txt - e2 * g2
        t_img = trajectory_terms(start[0], target[0], g_sum_img, e1)
        t_txt = trajectory_terms(start[1], target[1], g_sum_txt, e2)
        loss_img = t_img.num / t_img.denom
        loss_txt = t_txt.num / t_txt.denom
        if self.s.merge_loss:
            loss = (t_img.num + t_txt.num) / (t_img.denom + t_txt.denom)
        else:
            loss = loss_img + loss_txt
        w_img, w_txt = self._weights(t_img.denom, t_txt.denom)
        # eta gradient, closed form: dL_m/deta_m = 2 (Delta + eta G)^T G * w_m.
        if self.s.parity_eta_grad:
            ew_img, ew_txt = 1.0 / t_img.denom, 1.0 / t_txt.denom
        else:
            ew_img, ew_txt = w_img, w_txt
        g_eta_img = (2 * t_img.dot * ew_img).to(eta_img.dtype)
        g_eta_txt = (2 * t_txt.dot * ew_txt).to(eta_txt.dtype)
        dir_img = t_img.direction * w_img.to(th_img.dtype)
        dir_txt = t_txt.direction * w_txt.to(th_txt.dtype)
        # Pass 2: per step, d/d(data) of 2 * psi_i, accumulated.
        feats_leaf = None
        if feats is not None:
            with torch.enable_grad():
                feats_graph = self.encode(xl[touched])
            feats_leaf = feats_graph.detach().requires_grad_(True)
        acc = [xl, yl, *sl.values()] if feats_leaf is None else [feats_leaf, yl, *sl.values()]
        for i in range(plan.steps):
            idx = plan.batches[i]
            perm, lam = self._blend_args(i, plan)
            with torch.enable_grad():
                img_in = self._img_input(i, xl, plan, inverse, feats_leaf, no_grad_encode=False)
                s_blk = self.target_block(idx, sl, y.dtype, perm, lam)
                a, b = thetas[i]
                _, g1, g2 = self._step_grads(a, b, img_in, yl[idx], s_blk, perm, lam, True)
                psi = 2 * ((g1 * dir_img).sum() + (g2 * dir_txt).sum())
                used = [t for t in acc if t.requires_grad]
                torch.autograd.backward(psi, inputs=used)
        if feats_leaf is not None and feats_leaf.grad is not None:
            torch.autograd.backward(feats_graph, feats_leaf.grad, inputs=[xl])
        sim_grads = {k: v.grad for k, v in sl.items()}
        out = self._pack(xl.grad, yl.grad, g_eta_img, g_eta_txt, sim_grads, x, y, sl)
        return UnrollResult(loss.detach(), loss_img.detach(), loss_txt.detach(), out)

    # ----------------------------------------------------------------- output
    @staticmethod
    def _pack(gx, gy, ge1, ge2, gsim, x, y, sl) -> dict[str, torch.Tensor | None]:
        out: dict[str, torch.Tensor | None] = {
            "x": torch.zeros_like(x) if gx is None else gx,
            "y": torch.zeros_like(y) if gy is None else gy,
            "eta_img": ge1 if ge1 is not None else torch.zeros(()),
            "eta_txt": ge2 if ge2 is not None else torch.zeros(()),
        }
        for k, v in sl.items():
            g = gsim.get(k)
            out[f"sim.{k}"] = torch.zeros_like(v) if g is None else g
        return out


def make_unroller_for_lors(
    settings: UnrollSettings, encoder: nn.Module, txt_spec: HeadSpec, similarity=None
) -> Unroller:
    """An :class:`Unroller` whose image student is ``encoder`` itself (LoRS / MTT-VL)."""
    spec = FlatSpec.from_module(encoder, trainable_only=False)
    return Unroller(settings, encoder, spec, txt_spec, similarity)
