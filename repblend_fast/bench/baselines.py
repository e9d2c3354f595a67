"""LoRS and RepBlend distillation iterations as their authors run them, for the step benchmarks.

They ship with the package (not only in a source checkout), so that the step benchmark can always
time the baselines next to the fast path.

Written from docs/algorithm.md §4, §5, §10 and §11 (never from the authors' code), in the style of
the
research scripts, so that the benchmark measures what their structure costs:

* a module-based student: ``nn.Module`` s called through a re-parametrising wrapper on one flat
  parameter vector per modality (the MTT "ReparamModule" pattern, here ``functional_call``);
* a fresh model object per iteration (``copy.deepcopy``) and flat ``torch.cat`` copies of the
  expert snapshots, which are kept on the host as lists of per-parameter tensors;
* eager fp32, one ``torch.autograd.grad`` per student step;
* TESLA's two passes, re-encoding every step's images in both passes (pass 1 without a graph,
  pass 2 with one, so the frozen RepBlend encoder runs twice per step and the LoRS encoder is
  differentiated twice per step, once with ``create_graph``);
* ``torch.optim.SGD`` (momentum 0.5) on the synthetic images, texts, learning rates and similarity.

What is deliberately *not* reproduced (each would only make the baselines slower): re-reading
expert files from disk every iteration, dropout inside the unroll (off here, as in our default so
that the gradients are comparable), pass-1 gradients built with ``create_graph``.

The gradients equal those of :class:`repblend_fast.engine.unroll.Unroller` with
``meta_grad="tesla"``
(``share_encoder=True`` for RepBlend; :func:`repblend_fast.engine.unroll.make_unroller_for_lors`
for LoRS)
up to float rounding: ``tests/test_baselines.py`` checks it in float64.

Expert buffers: ``{"image": [pieces_epoch0, pieces_epoch1, ...], "text": [...]}`` with each
``pieces_epoch`` a list of tensors in the student's ``parameters()`` order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from repblend_fast.config import TEMPERATURE

__all__ = [
    "AuthorsHead",
    "AuthorsSettings",
    "LoRSAuthors",
    "LoRSModel",
    "LowRankSim",
    "RepBlendAuthors",
    "RepBlendModel",
    "split_pieces",
    "wbce_loss",
]


# --------------------------------------------------------------------------------------------------
# building blocks


class AuthorsHead(nn.Module):
    """``LayerNorm(Dropout(W2 GELU(W1 h + b1) + b2) + (W1 h + b1))`` (docs/algorithm.md §2)."""

    def __init__(self, d_in: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, dim)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        projected = self.fc1(h)
        x = self.fc2(self.gelu(projected))
        return self.norm(self.dropout(x) + projected)


class Reparam(nn.Module):
    """Runs ``module`` with its parameters replaced by views of one flat vector."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.numels = [p.numel() for _, p in module.named_parameters()]

    def forward(self, x: torch.Tensor, flat_param: torch.Tensor) -> torch.Tensor:
        views = {
            n: t.view(s)
            for n, t, s in zip(self.names, torch.split(flat_param, self.numels), self.shapes)
        }
        return functional_call(self.module, views, (x,), strict=False)


class LowRankSim(nn.Module):
    """Learned soft targets ``S = diag(a) + (alpha / r) L Rᵀ`` (docs/algorithm.md §6), as a module.

    ``block(idx, params)`` also accepts a dict of tensors (so the same object can serve an
    :class:`repblend_fast.engine.unroll.Unroller`).
    """

    def __init__(self, n: int, rank: int, alpha: float, generator=None, dtype=torch.float32):
        super().__init__()
        self.n, self.rank, self.alpha = n, rank, alpha
        self.a = nn.Parameter(torch.ones(n, dtype=dtype))
        self.L = nn.Parameter(torch.randn(n, rank, generator=generator, dtype=dtype))
        self.R = nn.Parameter(torch.zeros(n, rank, dtype=dtype))

    def params(self) -> dict[str, torch.Tensor]:
        return {"a": self.a, "L": self.L, "R": self.R}

    @torch.no_grad()
    def load_params(self, params: dict[str, torch.Tensor]) -> LowRankSim:
        for k, v in params.items():
            getattr(self, k).copy_(v)
        return self

    def block(
        self,
        idx: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
        *,
        check: bool = True,
    ):
        """``S[I, I]``: ``[B]`` -> ``[B, B]`` (``[K, B]`` -> ``[K, B, B]``); no index checks, as
        in the research code (``check`` is accepted for the Unroller's interface)."""
        p = self.params() if params is None else params
        low = p["L"][idx] @ p["R"][idx].transpose(-1, -2)
        return torch.diag_embed(p["a"][idx]) + self.alpha / self.rank * low


def wbce_loss(img_emb, txt_emb, target, logit_scale: float, eps: float = 1e-6):
    """Weighted BCE of docs/algorithm.md §7 on the ``[B, B]`` logits (rows = images)."""
    image_features = F.normalize(img_emb, dim=-1)
    text_features = F.normalize(txt_emb, dim=-1)
    logits = logit_scale * image_features @ text_features.T
    probs = torch.sigmoid(logits)
    loss = -target * torch.log(probs + eps) - (1 - target) * torch.log(1 - probs + eps)
    pos = (target > 0.5).to(logits.dtype)
    neg = 1 - pos
    pos_loss = (loss * pos).sum() / (pos.sum() + 1e-6)
    neg_loss = (loss * neg).sum() / (neg.sum() + 1e-6)
    return 0.5 * (pos_loss + neg_loss)


def split_pieces(module: nn.Module, flat: torch.Tensor) -> list[torch.Tensor]:
    """A flat vector as a list of per-parameter tensors (the layout of an expert buffer)."""
    out, off = [], 0
    for p in module.parameters():
        out.append(flat[off : off + p.numel()].view(p.shape).clone())
        off += p.numel()
    if off != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} elements, the module {off}")
    return out


@dataclass
class AuthorsSettings:
    """Hyper-parameters shared by both baselines (docs/algorithm.md §4, §12; flickr-100 values)."""

    logit_scale: float = 1 / TEMPERATURE
    eps: float = 1e-6
    merge_loss: bool = False
    lr_img: float = 100.0
    lr_txt: float = 100.0
    lr_lr: float = 1e-2
    lr_sim: float = 10.0
    momentum: float = 0.5
    syn_lr_init: float = 0.1


# --------------------------------------------------------------------------------------------------
# the shared outer loop


class _AuthorsLoop:
    """State and outer step shared by both baselines; subclasses define the student."""

    name = ""
    meta_grad = "tesla"

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        texts: torch.Tensor,
        sim: LowRankSim | None,
        buffer: dict[str, list[list[torch.Tensor]]],
        settings: AuthorsSettings | None = None,
        device: str | torch.device = "cpu",
    ):
        self.cfg = settings or AuthorsSettings()
        self.device = torch.device(device)
        self.model = model.to(self.device)
        dtype = texts.dtype
        self.image_syn = images.detach().to(self.device).clone().requires_grad_(True)
        self.text_syn = texts.detach().to(self.device).clone().requires_grad_(True)
        self.syn_lr_img = torch.tensor(self.cfg.syn_lr_init, dtype=dtype, device=self.device)
        self.syn_lr_txt = torch.tensor(self.cfg.syn_lr_init, dtype=dtype, device=self.device)
        self.syn_lr_img.requires_grad_(True)
        self.syn_lr_txt.requires_grad_(True)
        self.sim = sim.to(self.device) if sim is not None else None
        self.buffer = buffer
        c = self.cfg
        groups = [
            {"params": [self.image_syn], "lr": c.lr_img},
            {"params": [self.text_syn], "lr": c.lr_txt},
            {"params": [self.syn_lr_img, self.syn_lr_txt], "lr": c.lr_lr},
        ]
        if self.sim is not None:
            groups.append({"params": list(self.sim.parameters()), "lr": c.lr_sim})
        self.optimizer = torch.optim.SGD(groups, lr=c.lr_img, momentum=c.momentum)

    # ---------------------------------------------------------------- pieces
    def target_block(self, idx: torch.Tensor) -> torch.Tensor:
        if self.sim is None:
            return torch.eye(len(idx), dtype=self.text_syn.dtype, device=self.device)
        return self.sim.block(idx)

    def flat(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.to(self.device).reshape(-1) for p in pieces], 0)

    def student_loss(self, student, th_img, th_txt, i, plan, images, texts, target):
        raise NotImplementedError

    def data_leaves(self) -> list[torch.Tensor]:
        leaves = [self.image_syn, self.text_syn]
        if self.sim is not None:
            leaves += list(self.sim.parameters())
        return leaves

    # ---------------------------------------------------------------- one trajectory
    def meta_grads(self, plan, start_epoch: int = 0, expert_epochs: int = 1) -> torch.Tensor:
        """Pass 1, the matching loss and pass 2 of TESLA; gradients land in the leaves' ``.grad``.

        Returns the (detached) matching loss.
        """
        student = copy.deepcopy(self.model)
        img_net = self.image_student(student)
        txt_net = Reparam(student.text_head)
        nets = (student, img_net, txt_net)
        img_buf, txt_buf = self.buffer["image"], self.buffer["text"]
        start_img = self.flat(img_buf[start_epoch])
        start_txt = self.flat(txt_buf[start_epoch])
        target_img = self.flat(img_buf[start_epoch + expert_epochs])
        target_txt = self.flat(txt_buf[start_epoch + expert_epochs])
        lr_img, lr_txt = self.syn_lr_img.detach(), self.syn_lr_txt.detach()

        # Pass 1: the student unroll, no graph to the data.
        params_img, params_txt = [start_img.clone()], [start_txt.clone()]
        grad_sum_img = torch.zeros_like(start_img)
        grad_sum_txt = torch.zeros_like(start_txt)
        images_c, texts_c = self.image_syn.detach(), self.text_syn.detach()
        for i in range(plan.batches.shape[0]):
            idx = plan.batches[i]
            th_img = params_img[-1].detach().requires_grad_(True)
            th_txt = params_txt[-1].detach().requires_grad_(True)
            with torch.no_grad():
                target = self.target_block(idx)
            loss = self.student_loss(nets, th_img, th_txt, i, plan, images_c, texts_c, target)
            g_img, g_txt = torch.autograd.grad(loss, [th_img, th_txt])
            grad_sum_img += g_img
            grad_sum_txt += g_txt
            params_img.append((th_img - lr_img * g_img).detach())
            params_txt.append((th_txt - lr_txt * g_txt).detach())

        # Matching loss with the learning rates in the graph: theta_T = theta_0 - lr * G.
        final_img = start_img - self.syn_lr_img * grad_sum_img
        final_txt = start_txt - self.syn_lr_txt * grad_sum_txt
        num_img = ((final_img - target_img) ** 2).sum()
        num_txt = ((final_txt - target_txt) ** 2).sum()
        dist_img = ((start_img - target_img) ** 2).sum()
        dist_txt = ((start_txt - target_txt) ** 2).sum()
        if self.cfg.merge_loss:
            grand_loss = (num_img + num_txt) / (dist_img + dist_txt)
            w_img = w_txt = 1 / (dist_img + dist_txt)
        else:
            grand_loss = num_img / dist_img + num_txt / dist_txt
            w_img, w_txt = 1 / dist_img, 1 / dist_txt
        grand_loss.backward()

        # Pass 2: per step, the data gradient of lr <Delta + lr G, g_i> / D (single + square term).
        delta_img = target_img - start_img
        delta_txt = target_txt - start_txt
        leaves = self.data_leaves()
        for i in range(plan.batches.shape[0]):
            idx = plan.batches[i]
            th_img = params_img[i].detach().requires_grad_(True)
            th_txt = params_txt[i].detach().requires_grad_(True)
            target = self.target_block(idx)
            loss = self.student_loss(
                nets, th_img, th_txt, i, plan, self.image_syn, self.text_syn, target
            )
            g_img, g_txt = torch.autograd.grad(loss, [th_img, th_txt], create_graph=True)
            single_img = lr_img * (g_img * delta_img).sum()
            square_img = lr_img**2 * (g_img * grad_sum_img).sum()
            single_txt = lr_txt * (g_txt * delta_txt).sum()
            square_txt = lr_txt**2 * (g_txt * grad_sum_txt).sum()
            per_batch = w_img * (single_img + square_img) + w_txt * (single_txt + square_txt)
            grads = torch.autograd.grad(2 * per_batch, leaves, allow_unused=True)
            for leaf, g in zip(leaves, grads):
                if g is None:
                    continue
                leaf.grad = g if leaf.grad is None else leaf.grad + g
            del g_img, g_txt, per_batch, grads
        del student, nets, img_net, txt_net, params_img, params_txt
        return grand_loss.detach()

    def image_student(self, student: nn.Module):
        raise NotImplementedError

    # ---------------------------------------------------------------- outer step
    def iteration(self, plan, start_epoch: int = 0, expert_epochs: int = 1) -> float:
        """One distillation iteration: meta-gradients then one SGD-momentum step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.meta_grads(plan, start_epoch, expert_epochs)
        self.optimizer.step()
        return float(loss)

    def grads(self) -> dict[str, torch.Tensor | None]:
        """The leaves' gradients in :class:`repblend_fast.engine.unroll.UnrollResult` naming."""
        out = {
            "x": self.image_syn.grad,
            "y": self.text_syn.grad,
            "eta_img": self.syn_lr_img.grad,
            "eta_txt": self.syn_lr_txt.grad,
        }
        if self.sim is not None:
            out.update({f"sim.{k}": v.grad for k, v in self.sim.params().items()})
        return out


# --------------------------------------------------------------------------------------------------
# the two algorithms


class RepBlendModel(nn.Module):
    """RepBlend's network: frozen image encoder + image head + text head (texts are embeddings)."""

    def __init__(self, encoder: nn.Module, d_feat: int, d_txt: int, dim: int):
        super().__init__()
        self.image_encoder = encoder
        for p in self.image_encoder.parameters():
            p.requires_grad_(False)
        self.image_head = AuthorsHead(d_feat, dim)
        self.text_head = AuthorsHead(d_txt, dim)


class LoRSModel(nn.Module):
    """LoRS' network: the image encoder is the image student; a text head maps to its width."""

    def __init__(self, encoder: nn.Module, d_txt: int, dim: int):
        super().__init__()
        self.image_encoder = encoder
        self.text_head = AuthorsHead(d_txt, dim)


class RepBlendAuthors(_AuthorsLoop):
    """RepBlend (docs/algorithm.md §4) the authors' way: the frozen encoder runs on every step's
    batch in
    both TESLA passes, blending in feature space before the heads."""

    name = "repblend-authors"

    def image_student(self, student: RepBlendModel):
        student.image_encoder.eval()
        return Reparam(student.image_head)

    def student_loss(self, nets, th_img, th_txt, i, plan, images, texts, target):
        student, img_net, txt_net = nets
        idx = plan.batches[i]
        feats = student.image_encoder(images[idx])
        caps = texts[idx]
        lam = plan.lams[i]
        if float(lam) != 1.0:
            perm = plan.perms[i]
            feats = lam * feats + (1 - lam) * feats[perm]
            caps = lam * caps + (1 - lam) * caps[perm]
        img_emb = img_net(feats, th_img)
        txt_emb = txt_net(caps, th_txt)
        return wbce_loss(img_emb, txt_emb, target, self.cfg.logit_scale, self.cfg.eps)


class LoRSAuthors(_AuthorsLoop):
    """LoRS (docs/algorithm.md §4, LoRS mode) the authors' way: the image encoder's parameters are
    the image
    student, so both passes run (and pass 2 differentiates twice through) the whole encoder."""

    name = "lors-authors"

    def image_student(self, student: LoRSModel):
        student.image_encoder.eval()
        return Reparam(student.image_encoder)

    def student_loss(self, nets, th_img, th_txt, i, plan, images, texts, target):
        _, img_net, txt_net = nets
        idx = plan.batches[i]
        img_emb = img_net(images[idx], th_img)
        txt_emb = txt_net(texts[idx], th_txt)
        return wbce_loss(img_emb, txt_emb, target, self.cfg.logit_scale, self.cfg.eps)
