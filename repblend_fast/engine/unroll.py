"""The T-step student unroll and its meta-gradients (docs/algorithm.md §4, §5, §11).

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
``share_encoder=True`` the encoder runs once per iteration on the touched images and the whole
unroll lives in feature space; the cotangents of all steps are summed and pulled back through the
encoder with one VJP (blending is linear: the gather backward is exactly ``lam g + (1-lam) P^T g``).
``share_encoder=False`` re-encodes every step's batch (twice in TESLA), as the authors' code does;
eager calls reuse NFNet's standardised weights (:mod:`repblend_fast.models.standardized_conv`).
LoRS / MTT-VL train the image encoder itself (its parameters are the image-side flat vector).

Speed and memory settings (``UnrollSettings``; results equal within rounding, tests/test_compile.py,
tests/test_memory_budget.py):

* ``encoder_autocast``: the frozen encoder under ``torch.autocast`` (CUDA or CPU) in that dtype,
  its features cast back to the images' dtype;
* ``compile``: ``encoder`` runs the frozen encoder through ``torch.compile`` (its forward and, by
  AOTAutograd, its VJP; dynamic batch); ``step`` also compiles each unroll step, whose shapes are
  static: the step's parameter gradient is taken with ``torch.func.grad`` inside the compiled
  function (the reference ops, which inductor fuses itself), so the outer meta-gradient only
  differentiates the compiled graph once (AOTAutograd has no double backward); TESLA's step on
  torch < 2.12 goes through ``aot_eager`` (:mod:`repblend_fast.known_faults`). Inductor's default
  mode on every device: no CUDA graphs, because the exact unroll keeps every step's outputs
  alive until its backward and TESLA alternates grad modes between calls, which CUDA-graph
  trees only allow with explicit step marks;
* ``encoder_chunk`` / ``memory_budget_mib``: with shared features, keep the encoder graph of the
  first ``keep`` touched images and re-encode the others ``chunk`` at a time during the VJP; the
  budget chooses ``keep``, ``chunk`` and (exact mode) ``checkpoint_steps`` from a measured
  per-image graph size (:meth:`Unroller.memory_plan`, :mod:`repblend_fast.engine.memory_plan`).

The plan of an iteration's random draws, :class:`StepPlan`, lives in
:mod:`repblend_fast.engine.step_plan`,
the settings and result types in :mod:`repblend_fast.engine.unroll_settings` (all importable from
here
too). The phases are marked with :func:`repblend_fast.engine.ranges.phase` ranges.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from repblend_fast.config import COMPILE
from repblend_fast.engine.memory_plan import MemoryPlan, measure_image_graph_mib, plan_memory
from repblend_fast.engine.ranges import phase
from repblend_fast.engine.step_plan import StepPlan
from repblend_fast.engine.unroll_settings import (
    MetaGrad,
    SharedFeatures,
    UnrollResult,
    UnrollSettings,
)
from repblend_fast.known_faults import step_compile_backend
from repblend_fast.methods import student_for_experts
from repblend_fast.models.flat import FlatSpec
from repblend_fast.models.heads import HeadSpec, head_forward
from repblend_fast.models.standardized_conv import reuse_standardized_weights
from repblend_fast.ops import contrastive_loss, trajectory_distance, trajectory_terms

__all__ = [
    "MetaGrad", "SharedFeatures", "StepPlan", "UnrollResult", "UnrollSettings", "Unroller",
    "make_unroller_for_lors",
]  # fmt: skip


class Unroller:
    """Runs the unroll of K trajectories at once and returns their meta-gradients.
    Internally every flat parameter vector carries a leading K: the K students of RepBlend are
    batched (``bmm`` heads, ``[K, B, D]`` contrastive losses, ``[K, B]`` blending). The LoRS student
    (a whole encoder) runs one trajectory per call.

    Args:
        settings: the unroll options.
        encoder: the image encoder ``f`` (frozen for RepBlend, the image student for LoRS), mapping
            images ``[B, 3, H, W]`` to features ``[B, d_f]``.
        img_spec: ``HeadSpec`` of the image head (RepBlend) or ``FlatSpec`` of the encoder (LoRS).
        txt_spec: ``HeadSpec`` of the text head.
        similarity: ``params()`` + ``block(indices, params, check=)``, or None (identity targets).
    """

    compile_backend = "inductor"
    """``torch.compile`` backend of ``compile`` (tests use ``aot_eager`` to check the tracing
    without inductor's minutes of C++ compilation on a CPU)."""

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
        if settings.compile not in COMPILE:
            raise ValueError(f"compile must be one of {COMPILE}, got {settings.compile!r}")
        self.kind = student_for_experts(settings.method)
        if settings.compile != "none" and not self.kind.frozen_encoder:
            raise ValueError(
                f"compile={settings.compile!r} compiles RepBlend's frozen encoder and its "
                "feature-space unroll; the LoRS student encoder runs eagerly: use compile='none'"
            )
        spec_type = self.kind.image_spec_type()
        if not isinstance(img_spec, spec_type):
            raise ValueError(
                f"method={settings.method!r} needs img_spec to be a {spec_type.__name__} "
                f"(the {self.kind.name} student's image side)"
            )
        if not settings.memory_budget_mib >= 0:
            raise ValueError(f"memory_budget_mib must be >= 0, got {settings.memory_budget_mib}")
        # compile='step': the ops' reference math runs inside the compiled step, where inductor
        # fuses it (the hand-written kernels are opaque to it); eager steps use the fused ops.
        self._impl = "reference" if settings.compile == "step" else "auto"
        self._compiled: dict[tuple[str, str], object] = {}
        self._image_bytes: dict[tuple, float] = {}
        self._standardized: dict = {}
        self.last_memory_plan: MemoryPlan | None = None

    # ----------------------------------------------------------------- pieces
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-encoder features ``[n, d_f]`` in the images' dtype (autocast and
        ``torch.compile`` when configured)."""
        with phase("encoder_forward"):
            if self.s.compile == "none":
                with reuse_standardized_weights(self.encoder, self._standardized):
                    return self._encode_eager(images)
            fn = self._compiled_fn("encoder", self._encode_eager, images.device, static=False)
            if images.shape[0] > 1:
                # The number of touched images changes every iteration: one graph for all of
                # them (a hint, not a constraint: an encoder that needs a static batch compiles).
                torch._dynamo.maybe_mark_dynamic(images, 0)
            return fn(images)

    def _encode_eager(self, images: torch.Tensor) -> torch.Tensor:
        # Autocast on whatever device the images are on (CUDA, or a CPU when asked for
        # explicitly: DistillConfig's "auto" is off on a CPU); float64 inputs are never cast.
        ac = self.s.encoder_autocast
        ctx = torch.autocast(images.device.type, dtype=ac) if ac is not None else nullcontext()
        with ctx:
            out = self.encoder(images)
        return out.to(images.dtype)

    def _compiled_fn(self, name: str, fn, device: torch.device, *, static: bool):
        """``torch.compile`` of ``fn``, made once per (name, device type).

        ``static``: the unroll step (fixed shapes, no graph break allowed, so that no host read
        can hide in it). Otherwise the frozen encoder (any module, dynamic batch, graph breaks
        allowed).
        """
        key = (name, device.type)
        out = self._compiled.get(key)
        if out is None:
            if static:
                backend, _ = step_compile_backend(
                    self.s.meta_grad, self.compile_backend, torch.__version__
                )
                out = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)
            else:
                out = torch.compile(fn, backend=self.compile_backend)
            self._compiled[key] = out
        return out

    def target_block(self, idx: torch.Tensor, sim_params, dtype, perm=None, lam=None):
        """``S[I, I]`` ``[K, B, B]`` for indices ``[K, B]`` (identity without a similarity
        generator), blended with the batch permutation when ``blend_target`` is set."""
        k, b = idx.shape
        if self.similarity is None:
            return torch.eye(b, dtype=dtype, device=idx.device).expand(k, b, b)
        # The plan's indices are valid by construction: no range check (it would read them).
        s = self.similarity.block(idx, sim_params, check=False)
        if self.s.blend_target and perm is not None:
            ar = torch.arange(k, device=idx.device)[:, None, None]
            sp = s[ar, perm[:, :, None], perm[:, None, :]]
            lam_v = lam.to(s.dtype)[:, None, None]
            s = lam_v * s + (1 - lam_v) * sp
        return s

    def step_loss(self, th_img, th_txt, img_in, y_b, s_blk, perm, lam, keep=(None, None)):
        """Per-trajectory losses ``[K]`` of one step.

        ``th_*``: ``[K, numel]``; ``img_in``: features ``[K, B, d_f]`` (RepBlend) or images
        ``[K, B, 3, H, W]`` (LoRS, K = 1); ``y_b`` ``[K, B, d_t]``; ``s_blk`` ``[K, B, B]``.
        """
        e_img, y_b = self.kind.embed_image(self, th_img, img_in, y_b, perm, lam, keep[0])
        e_txt = head_forward(th_txt, y_b, self.txt_spec, keep=keep[1])
        return contrastive_loss(
            e_img,
            e_txt,
            s_blk,
            logit_scale=self.s.logit_scale,
            loss=self.s.loss,
            eps=self.s.eps,
            impl=self._impl,
        )

    def _func_step_grads(self, th_img, th_txt, img_in, y_b, s_blk, perm, lam, keep_img, keep_txt):
        """``(sum of the K losses, g_img, g_txt)`` with ``torch.func.grad``: a plain function of
        its inputs (the compiled step; its outputs are differentiable like ``create_graph``)."""

        def total(a, b):
            return self.step_loss(a, b, img_in, y_b, s_blk, perm, lam, (keep_img, keep_txt)).sum()

        (g_img, g_txt), loss = torch.func.grad_and_value(total, argnums=(0, 1))(th_img, th_txt)
        return loss, g_img, g_txt

    def _step_grads(
        self, th_img, th_txt, img_in, y_b, s_blk, perm, lam, create_graph: bool, keep=(None, None)
    ):
        if self.s.compile == "step":
            fn = self._compiled_fn("step", self._func_step_grads, th_img.device, static=True)
            with nullcontext() if create_graph else torch.no_grad():
                return fn(th_img, th_txt, img_in, y_b, s_blk, perm, lam, keep[0], keep[1])
        if not th_img.requires_grad:
            th_img = th_img.detach().requires_grad_(True)
        if not th_txt.requires_grad:
            th_txt = th_txt.detach().requires_grad_(True)
        with torch.enable_grad():
            # The K losses depend on disjoint parameter rows: the gradient of their sum is the
            # stack of the per-trajectory gradients.
            loss = self.step_loss(th_img, th_txt, img_in, y_b, s_blk, perm, lam, keep).sum()
            g_img, g_txt = torch.autograd.grad(loss, (th_img, th_txt), create_graph=create_graph)
        return loss, g_img, g_txt

    # ----------------------------------------------------------------- entry points
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
        """Unroll one trajectory, or K at once, and return losses and meta-gradients.

        Args:
            x: synthetic images ``[N, 3, H, W]`` (its gradient is returned, not accumulated).
            y: synthetic texts ``[N, d_t]``.
            sim_params: the similarity generator's leaf tensors (may be empty).
            eta_img, eta_txt: 0-d learnable student learning rates (shared by the K students).
            start, target: ``(theta_img, theta_txt)`` at the start and target epochs: flat
                ``[numel]`` vectors, or ``[K, numel]`` for K trajectories.
            plan: batches, blending coefficients and permutations (``[T, ...]`` or
                ``[K, T, ...]``).

        With K trajectories the loss and every gradient are the mean over the K.
        """
        if self.s.meta_grad not in ("exact", "tesla"):
            raise ValueError(f"meta_grad must be 'exact' or 'tesla', got {self.s.meta_grad!r}")
        start = tuple(t if t.dim() == 2 else t[None] for t in start)
        target = tuple(t if t.dim() == 2 else t[None] for t in target)
        plan = plan.batched()
        k = plan.k
        if start[0].shape[0] != k or start[1].shape[0] != k or target[0].shape[0] != k:
            raise ValueError(
                f"plan has K={k} trajectories but start/target have "
                f"{start[0].shape[0]}/{target[0].shape[0]} rows"
            )
        if (most := self.kind.trajectories_per_call) is not None and k > most:
            raise ValueError(f"method={self.s.method!r} unrolls K={most} trajectory per call")
        fn = self._run_exact if self.s.meta_grad == "exact" else self._run_tesla
        with phase("unroll"):  # the other phases nest in it (ranges.py)
            return fn(x, y, sim_params, eta_img, eta_txt, start, target, plan)

    # ----------------------------------------------------------------- helpers
    def _leaves(self, x, y, sim_params, eta_img, eta_txt):
        xl = x.detach().requires_grad_(True)
        yl = y.detach().requires_grad_(True)
        sl = {k: v.detach().requires_grad_(True) for k, v in sim_params.items()}
        el = eta_img.detach().requires_grad_(True)
        tl = eta_txt.detach().requires_grad_(True)
        return xl, yl, sl, el, tl

    def memory_plan(self, x: torch.Tensor, touched: int, start, plan: StepPlan) -> MemoryPlan:
        """How this iteration holds the shared encoder graph
        (:func:`repblend_fast.engine.memory_plan.plan_memory` with these settings)."""
        return plan_memory(self.s, x, touched, start, plan, lambda: self.image_graph_mib(x))

    def image_graph_mib(self, x: torch.Tensor) -> float:
        """MiB of encoder graph one more image keeps alive
        (:func:`repblend_fast.engine.memory_plan.measure_image_graph_mib`), measured once per image
        shape, dtype, device and autocast dtype."""
        key = (tuple(x.shape[1:]), x.dtype, x.device, self.s.encoder_autocast)
        if key not in self._image_bytes:
            self._image_bytes[key] = measure_image_graph_mib(self._encode_eager, self.encoder, x)
        return self._image_bytes[key]

    def _touched(self, xl: torch.Tensor, plan: StepPlan, start) -> SharedFeatures | None:
        """Shared features: one encoder pass over the touched images (RepBlend), else None.

        The unroll reads a detached leaf; :meth:`_encoder_vjp` later pulls its summed cotangent
        back to the images, through the graph kept here for the first ``keep`` touched images
        and by re-encoding the others ``chunk`` at a time (:meth:`memory_plan`; less memory,
        one more encoder forward for those). Sets :attr:`last_memory_plan`.
        """
        if not self.kind.shares_encoder(self.s):
            self.last_memory_plan = self.memory_plan(xl, 0, start, plan)
            return None
        if plan.touched is not None:
            touched, inverse = plan.touched, plan.inverse
        else:
            touched, inverse = torch.unique(plan.batches, return_inverse=True)
        n = touched.numel()
        mp = self.last_memory_plan = self.memory_plan(xl, n, start, plan)
        if mp.keep >= n:
            with torch.enable_grad():
                graph = self.encode(xl[touched])
            return SharedFeatures(touched, inverse, graph, graph.detach().requires_grad_(True), n)
        graph, parts = None, []
        if mp.keep > 0:
            with torch.enable_grad():
                graph = self.encode(xl[touched[: mp.keep]])
            parts.append(graph.detach())
        with torch.no_grad():
            for lo in range(mp.keep, n, mp.chunk):
                parts.append(self.encode(xl[touched[lo : lo + mp.chunk]]))
        leaf = (torch.cat(parts) if len(parts) > 1 else parts[0]).requires_grad_(True)
        return SharedFeatures(touched, inverse, graph, leaf, mp.keep, mp.chunk)

    def _encoder_vjp(self, xl: torch.Tensor, shared: SharedFeatures) -> torch.Tensor | None:
        """``d loss / d x`` from the shared features' cotangent (``None`` if it has none): the
        kept graph's VJP first (freeing it), then the re-encoded chunks one at a time."""
        with phase("encoder_vjp"):
            return self._encoder_vjp_pieces(xl, shared)

    def _encoder_vjp_pieces(self, xl: torch.Tensor, shared: SharedFeatures):
        cot = shared.leaf.grad
        if cot is None:
            return None
        n, keep = shared.touched.numel(), shared.keep
        if shared.graph is not None:
            (gx,) = torch.autograd.grad(shared.graph, xl, cot if keep >= n else cot[:keep])
            if keep >= n:
                return gx
        else:
            gx = torch.zeros_like(xl)
        chunk = shared.chunk
        for lo in range(keep, n, chunk):
            rows = shared.touched[lo : lo + chunk]
            xc = xl[rows].detach().requires_grad_(True)
            with torch.enable_grad():
                fc = self.encode(xc)
            (g,) = torch.autograd.grad(fc, xc, cot[lo : lo + chunk])
            gx.index_add_(0, rows, g)
        return gx

    def _img_input(self, i, xl, plan, inverse, feats, no_grad_encode: bool):
        """Step i's image-side input ``[K, B, ...]``."""
        rows = feats[inverse[:, i]] if feats is not None else None
        return self.kind.image_input(self, xl, plan.batches[:, i], rows, no_grad_encode)

    def _blend_args(self, i, plan):
        lam = plan.lams[:, i]
        if plan.blend is False or (plan.blend is None and bool((lam == 1.0).all())):
            return None, None
        return plan.perms[:, i], lam

    def _matching(self, th, start, target):
        """Per-trajectory matching losses ``[K]`` (image, text, total) of the final parameters."""
        k = th[0].shape[0]
        li = torch.stack(
            [
                trajectory_distance(th[0][j], start[0][j], target[0][j], check=False)
                for j in range(k)
            ]
        )
        lt = torch.stack(
            [
                trajectory_distance(th[1][j], start[1][j], target[1][j], check=False)
                for j in range(k)
            ]
        )
        if not self.s.merge_loss:
            return li, lt, li + lt
        num = (th[0] - target[0]).pow(2).sum(1) + (th[1] - target[1]).pow(2).sum(1)
        den = (start[0] - target[0]).pow(2).sum(1) + (start[1] - target[1]).pow(2).sum(1)
        return li, lt, num / den

    # ----------------------------------------------------------------- exact
    def _run_exact(self, x, y, sim_params, eta_img, eta_txt, start, target, plan):
        xl, yl, sl, el, tl = self._leaves(x, y, sim_params, eta_img, eta_txt)
        shared = self._touched(xl, plan, start)
        ckpt = self.last_memory_plan.checkpoint_steps
        inverse, feats = (shared.inverse, shared.leaf) if shared is not None else (None, None)
        th_img, th_txt = start[0].detach(), start[1].detach()
        if self.s.compile == "step":
            # Every step then sees parameters that require grad: one compiled graph for all.
            th_img, th_txt = th_img.requires_grad_(True), th_txt.requires_grad_(True)
        with torch.enable_grad():
            for i in range(plan.steps):
                idx = plan.batches[:, i]
                perm, lam = self._blend_args(i, plan)
                img_in = self._img_input(i, xl, plan, inverse, feats, no_grad_encode=False)
                s_blk = self.target_block(idx, sl, y.dtype, perm, lam)
                keep_i = plan.keep(i)

                def step(a, b, img_in, y_b, s_blk, e1, e2, perm=perm, lam=lam, keep=keep_i):
                    _, g1, g2 = self._step_grads(a, b, img_in, y_b, s_blk, perm, lam, True, keep)
                    return a - e1 * g1, b - e2 * g2

                args = (th_img, th_txt, img_in, yl[idx], s_blk, el, tl)
                if ckpt:
                    th_img, th_txt = checkpoint(step, *args, use_reentrant=False)
                else:
                    th_img, th_txt = step(*args)
            with phase("meta_gradient"):
                li, lt, total = self._matching((th_img, th_txt), start, target)
                loss = total.mean()
                inputs = [feats if shared is not None else xl, yl, el, tl, *sl.values()]
                grads = list(torch.autograd.grad(loss, inputs, allow_unused=True))
        if shared is not None:
            shared.leaf.grad = grads[0]
            grads[0] = self._encoder_vjp(xl, shared)
        out = self._pack(grads[0], grads[1], grads[2], grads[3], dict(zip(sl, grads[4:])), x, y, sl)
        return UnrollResult(loss.detach(), li.mean().detach(), lt.mean().detach(), out)

    # ----------------------------------------------------------------- tesla
    def _run_tesla(self, x, y, sim_params, eta_img, eta_txt, start, target, plan):
        xl, yl, sl, el, tl = self._leaves(x, y, sim_params, eta_img, eta_txt)
        e1, e2 = eta_img.detach(), eta_txt.detach()
        k = plan.k
        # Pass 1: the unroll without a graph, keeping G = sum_i g_i (and theta_i only when pass 2
        # draws its own dropout masks: otherwise pass 2 recomputes theta_i from its own g_i, which
        # equal pass 1's, so that T flat parameter sets need not be held). The shared features
        # are computed once for both passes.
        shared = self._touched(xl, plan, start)
        store = plan.keep_img2 is not None or plan.keep_txt2 is not None
        inverse = shared.inverse if shared is not None else None
        feats = shared.leaf.detach() if shared is not None else None
        th_img, th_txt = start[0].detach(), start[1].detach()
        thetas = []
        g_sum_img = torch.zeros_like(th_img)
        g_sum_txt = torch.zeros_like(th_txt)
        with torch.no_grad():
            sl_c = {name: v.detach() for name, v in sl.items()}
            for i in range(plan.steps):
                idx = plan.batches[:, i]
                perm, lam = self._blend_args(i, plan)
                img_in = self._img_input(i, xl, plan, inverse, feats, no_grad_encode=True)
                s_blk = self.target_block(idx, sl_c, y.dtype, perm, lam)
                if store:
                    thetas.append((th_img, th_txt))
                _, g1, g2 = self._step_grads(
                    th_img,
                    th_txt,
                    img_in.detach(),
                    y[idx].detach(),
                    s_blk,
                    perm,
                    lam,
                    False,
                    plan.keep(i),
                )
                g_sum_img += g1
                g_sum_txt += g2
                th_img = th_img - e1 * g1
                th_txt = th_txt - e2 * g2
        # One fused pass per trajectory and modality: D, ||Delta + eta G||^2, (Delta + eta G)^T G
        # and the pass-2 direction c = eta (Delta + eta G).
        # No value checks inside the unroll (they would read the device); a degenerate
        # trajectory shows as a non-finite loss, which the outer optimiser refuses.
        # TESLA's meta-gradient: the terms, then pass 2.
        with phase("meta_gradient"):
            terms = lambda a, b, c, e: trajectory_terms(a, b, c, e, check=False)  # noqa: E731
            ti = [terms(start[0][j], target[0][j], g_sum_img[j], e1) for j in range(k)]
            tt = [terms(start[1][j], target[1][j], g_sum_txt[j], e2) for j in range(k)]
            den_i = torch.stack([t.denom for t in ti])
            den_t = torch.stack([t.denom for t in tt])
            num_i = torch.stack([t.num for t in ti])
            num_t = torch.stack([t.num for t in tt])
            dot_i = torch.stack([t.dot for t in ti])
            dot_t = torch.stack([t.dot for t in tt])
            loss_img, loss_txt = num_i / den_i, num_t / den_t
            if self.s.merge_loss:
                total = (num_i + num_t) / (den_i + den_t)
                w_img = w_txt = 1.0 / (den_i + den_t)
            else:
                total = loss_img + loss_txt
                w_img, w_txt = 1.0 / den_i, 1.0 / den_t
            # eta gradient, closed form: dL_m/deta_m = 2 (Delta + eta G)^T G * w_m (mean over K).
            ew_img, ew_txt = (
                (1.0 / den_i, 1.0 / den_t) if self.s.parity_eta_grad else (w_img, w_txt)
            )
            g_eta_img = (2 * dot_i * ew_img).mean().to(eta_img.dtype)
            g_eta_txt = (2 * dot_t * ew_txt).mean().to(eta_txt.dtype)
            # Pass-2 directions with the weights w_m / K folded in, [K, numel].
            dir_img = torch.stack([t.direction for t in ti]) * (w_img / k).to(th_img.dtype)[:, None]
            dir_txt = torch.stack([t.direction for t in tt]) * (w_txt / k).to(th_txt.dtype)[:, None]
            # Pass 2: per step, d/d(data) of 2 * psi_i, accumulated into the leaves' .grad.
            feats_leaf = shared.leaf if shared is not None else None
            acc = [xl, yl, *sl.values()] if feats_leaf is None else [feats_leaf, yl, *sl.values()]
            cur = (start[0].detach(), start[1].detach())
            for i in range(plan.steps):
                idx = plan.batches[:, i]
                perm, lam = self._blend_args(i, plan)
                with torch.enable_grad():
                    img_in = self._img_input(i, xl, plan, inverse, feats_leaf, no_grad_encode=False)
                    s_blk = self.target_block(idx, sl, y.dtype, perm, lam)
                    a, b = thetas[i] if store else cur
                    keep = plan.keep(i, second_pass=True)
                    _, g1, g2 = self._step_grads(
                        a, b, img_in, yl[idx], s_blk, perm, lam, True, keep
                    )
                    psi = 2 * ((g1 * dir_img).sum() + (g2 * dir_txt).sum())
                    torch.autograd.backward(psi, inputs=acc)
                if not store and i + 1 < plan.steps:
                    with torch.no_grad():
                        cur = (a - e1 * g1, b - e2 * g2)
        # One VJP through the encoder with the summed feature cotangents of all steps.
        gx = self._encoder_vjp(xl, shared) if shared is not None else xl.grad
        sim_grads = {name: v.grad for name, v in sl.items()}
        out = self._pack(gx, yl.grad, g_eta_img, g_eta_txt, sim_grads, x, y, sl)
        return UnrollResult(
            total.mean().detach(), loss_img.mean().detach(), loss_txt.mean().detach(), out
        )

    # ----------------------------------------------------------------- output
    @staticmethod
    def _pack(gx, gy, ge1, ge2, gsim, x, y, sl) -> dict[str, torch.Tensor | None]:
        out: dict[str, torch.Tensor | None] = {
            "x": torch.zeros_like(x) if gx is None else gx,
            "y": torch.zeros_like(y) if gy is None else gy,
            "eta_img": ge1 if ge1 is not None else torch.zeros((), dtype=y.dtype),
            "eta_txt": ge2 if ge2 is not None else torch.zeros((), dtype=y.dtype),
        }
        for name, v in sl.items():
            g = gsim.get(name)
            out[f"sim.{name}"] = torch.zeros_like(v) if g is None else g
        return out


def make_unroller_for_lors(
    settings: UnrollSettings, encoder: nn.Module, txt_spec: HeadSpec, similarity=None
) -> Unroller:
    """An :class:`Unroller` whose image student is ``encoder`` itself (LoRS / MTT-VL)."""
    spec = FlatSpec.from_module(encoder, trainable_only=False)
    return Unroller(settings, encoder, spec, txt_spec, similarity)
