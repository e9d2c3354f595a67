"""The outer optimiser: SGD with momentum on the synthetic set, with a guard against spikes.

Four parameter groups (docs/algorithm.md §4 step 5): the synthetic images ``x`` (``lr_img``), the
synthetic texts ``y`` (``lr_txt``), the learned student learning rates ``eta_img``/``eta_txt``
(``lr_lr``, optionally clamped at ``clamp_lr``) and the similarity parameters (``lr_sim``).
Momentum as ``torch.optim.SGD`` (dampening 0, the first step's buffer is the gradient itself).

Every decision is taken on the device (``torch.where``), never by reading a value back: one step
costs no host synchronisation, and :meth:`OuterOptimizer.step` returns its statistics as 0-d
tensors for the caller to read back together with its metrics, once per iteration.

Always on: an update whose loss or meta-gradient is non-finite, or that would make a parameter
non-finite, is not applied (the state stays the last finite one).

The robust-optimisation guard (``DistillConfig.guard``, docs/algorithm.md §14):

- **trust region**: each synthetic pair's update (its image, its text, its row of similarity
  parameters) is at most ``trust_region`` times the group's RMS row norm; the gradient row is
  scaled down before it enters the momentum buffer;
- **spike rejection**: an iteration whose meta-gradient norm in some group exceeds
  ``spike_factor`` times that group's running median (over the last ``guard_window`` accepted
  iterations, once ``guard_warmup`` are known) is not applied, and that group's learning rate is
  halved for ``guard_cooldown`` iterations;
- **loss-jump rollback**: when the matching loss exceeds ``loss_jump`` times its running median,
  the previous update (which led here) is undone — parameters and momentum restored — this
  iteration is not applied, and every group's learning rate is halved for ``guard_cooldown``
  iterations;
- **η clamp without a trap**: when the clamp binds, the η momentum is reset, so a buffer that
  kept pushing η down cannot pin it at the clamp after the gradient turns.
"""

from __future__ import annotations

import torch

from repblend_fast.config import DistillConfig

__all__ = ["CLIPPED_GROUPS", "GROUPS", "OuterOptimizer"]

# Group of each parameter name (similarity parameters are "sim.<name>").
GROUPS = ("image", "text", "eta", "sim")
# The groups whose rows (one per synthetic pair) the trust region bounds.
CLIPPED_GROUPS = ("image", "text", "sim")


def _group(name: str) -> str:
    if name == "x":
        return "image"
    if name == "y":
        return "text"
    if name.startswith("eta"):
        return "eta"
    return "sim"


def _all_finite(tensors) -> torch.Tensor:
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def _rows(d: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The tensors ``names`` of ``d`` side by side, one row per pair ``[N, ...]``."""
    return torch.cat([d[n].reshape(d[n].shape[0], -1).float() for n in names], dim=1)


class OuterOptimizer:
    """SGD with momentum over the named leaf tensors in ``params`` (updated in place).

    Args:
        config: learning rates, momentum, ``clamp_lr`` and the guard settings.
        params: ``{"x", "y", "eta_img", "eta_txt", "sim.<name>" ...}`` leaf tensors.
    """

    def __init__(self, config: DistillConfig, params: dict[str, torch.Tensor]):
        self.cfg = config
        self.params = params
        lr = {"image": config.lr_img, "text": config.lr_txt, "eta": config.lr_lr}
        lr["sim"] = config.lr_sim
        self.lr = {name: lr[_group(name)] for name in params}
        self.momentum: dict[str, torch.Tensor] = {}
        dev = params["x"].device
        self.device = dev
        self.guard = config.guard
        w, g = config.guard_window, len(GROUPS)
        self.norm_hist = torch.full((w, g), float("nan"), device=dev)
        self.loss_hist = torch.full((w,), float("nan"), device=dev)
        self.scale = torch.ones(g, device=dev)
        self.cooldown = torch.zeros(g, dtype=torch.long, device=dev)
        self.prev: dict[str, torch.Tensor] = {}
        self.prev_valid = torch.zeros((), dtype=torch.bool, device=dev)
        self.pos = 0

    # ----------------------------------------------------------------- one step
    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Apply (or not) one update; returns 0-d statistics tensors (on the device).

        ``grads`` holds a gradient for every parameter; ``loss`` is the iteration's matching loss
        (evaluated at the current parameters, before this update).
        """
        names = list(self.params)
        g = {n: grads[n].to(self.params[n].dtype) for n in names}
        finite = (
            torch.isfinite(loss) & torch.stack([torch.isfinite(g[n]).all() for n in names]).all()
        )
        norms = self._group_norms(g)
        stats: dict[str, torch.Tensor] = {"finite": finite}
        accept = finite
        reject_groups = torch.zeros(len(GROUPS), dtype=torch.bool, device=self.device)
        rollback = torch.zeros((), dtype=torch.bool, device=self.device)
        if self.guard:
            spikes, jump = self._detect(norms, loss)
            reject_groups = spikes
            rollback = jump & self.prev_valid & finite
            accept = accept & ~spikes.any() & ~jump
            self._rollback(rollback)
            g, clipped = self._trust_region(g)
            stats.update({f"spike_{k}": spikes[i] for i, k in enumerate(GROUPS)})
            stats.update({f"clipped_{k}": v for k, v in clipped.items()})
        lr_scale = self.scale if self.guard else None
        cand, bufs = self._candidates(g, lr_scale)
        cand_finite = _all_finite(cand.values())
        accept = accept & cand_finite
        stats["update_finite"] = cand_finite
        if self.guard:
            for n in names:  # the state this update starts from, for a later rollback
                self.prev.setdefault(n, torch.empty_like(self.params[n]))
                self.prev[n].copy_(torch.where(accept, self.params[n], self.prev[n]))
                self.prev.setdefault("m." + n, torch.zeros_like(self.params[n]))
                if n in self.momentum:
                    old = self.momentum[n]
                    self.prev["m." + n].copy_(torch.where(accept, old, self.prev["m." + n]))
            self.prev_valid = torch.where(rollback, False, self.prev_valid | accept)
        self._commit(cand, bufs, accept)
        if self.guard:
            self._update_guard(norms, loss, accept, reject_groups, rollback)
            stats["rollback"] = rollback
            stats.update({f"lr_scale_{k}": self.scale[i] for i, k in enumerate(GROUPS)})
        stats["accepted"] = accept
        stats.update({f"grad_norm_{k}": norms[i] for i, k in enumerate(GROUPS)})
        return stats

    def _group_norms(self, g: dict[str, torch.Tensor]) -> torch.Tensor:
        """Meta-gradient norm of each group ``[len(GROUPS)]`` (0 for an empty group)."""
        sq = {k: [] for k in GROUPS}
        for n, t in g.items():
            sq[_group(n)].append(t.float().pow(2).sum())
        zero = torch.zeros((), device=self.device)
        return torch.stack([torch.stack(v).sum() if v else zero for v in sq.values()]).sqrt()

    def _candidates(self, g, lr_scale):
        """Momentum buffers and parameters after an applied update (nothing committed yet)."""
        cfg = self.cfg
        cand, bufs = {}, {}
        for n, p in self.params.items():
            buf = self.momentum.get(n)
            bufs[n] = g[n] if buf is None else buf * cfg.momentum + g[n]
            lr = self.lr[n]
            if lr_scale is not None:
                lr = lr * lr_scale[GROUPS.index(_group(n))].to(p.dtype)
            new = p - lr * bufs[n]
            if n.startswith("eta") and cfg.clamp_lr is not None:
                new = new.clamp(min=cfg.clamp_lr)
            cand[n] = new
        return cand, bufs

    def _commit(self, cand, bufs, accept) -> None:
        cfg = self.cfg
        for n, p in self.params.items():
            old = self.momentum.get(n)
            buf = bufs[n]
            if n.startswith("eta") and cfg.clamp_lr is not None and self.guard:
                # The clamp bound this update: forget the momentum that pushed past it.
                buf = torch.where(cand[n] <= cfg.clamp_lr, torch.zeros_like(buf), buf)
            if old is None:
                self.momentum[n] = torch.where(accept, buf, torch.zeros_like(buf))
            else:
                old.copy_(torch.where(accept, buf, old))
            p.copy_(torch.where(accept, cand[n], p))

    # ----------------------------------------------------------------- the guard
    def _detect(self, norms: torch.Tensor, loss: torch.Tensor):
        """``(spike per group [G], loss jump [])`` against the running medians."""
        cfg = self.cfg
        known = (~torch.isnan(self.norm_hist)).sum(0)
        med = torch.nanmedian(self.norm_hist, dim=0).values
        spikes = (known >= cfg.guard_warmup) & (norms > cfg.spike_factor * med)
        lknown = (~torch.isnan(self.loss_hist)).sum()
        lmed = torch.nanmedian(self.loss_hist)
        jump = (lknown >= cfg.guard_warmup) & (loss.float() > cfg.loss_jump * lmed)
        return spikes, jump

    def _rollback(self, rollback: torch.Tensor) -> None:
        """Undo the previous update where ``rollback`` (parameters and momentum)."""
        if not self.prev:
            return
        for n, p in self.params.items():
            p.copy_(torch.where(rollback, self.prev[n], p))
            if n in self.momentum:
                self.momentum[n].copy_(torch.where(rollback, self.prev["m." + n], self.momentum[n]))

    def _trust_region(self, g: dict[str, torch.Tensor]):
        """Scale each pair's gradient row so that ``lr · ||row||`` stays within ``trust_region``
        times the group's RMS row norm (images, texts, similarity rows).

        Returns the scaled gradients and, per row group (``image``, ``text``, ``sim``), the
        fraction of its rows that were scaled down (0-d tensors; 0 without a bound).
        """
        tau = self.cfg.trust_region
        zero = torch.zeros((), device=self.device)
        clipped = dict.fromkeys(CLIPPED_GROUPS, zero)
        if tau <= 0:
            return g, clipped
        out = dict(g)
        sim = [n for n in g if _group(n) == "sim" and self.params[n].dim() >= 1]
        for group, names in zip(CLIPPED_GROUPS, (["x"], ["y"], sim)):
            if not names:
                continue
            ref = _rows(self.params, names).norm(dim=1).pow(2).mean().sqrt()
            step = self.lr[names[0]] * _rows(g, names).norm(dim=1)
            factor = torch.clamp(tau * ref / step.clamp_min(1e-30), max=1.0)
            clipped[group] = (factor < 1).float().mean()
            for n in names:
                shape = (-1,) + (1,) * (g[n].dim() - 1)
                out[n] = g[n] * factor.reshape(shape).to(g[n].dtype)
        return out, clipped

    def _update_guard(self, norms, loss, accept, spikes, rollback) -> None:
        """Running histories (accepted iterations only) and the per-group learning-rate scales."""
        cfg = self.cfg
        w = cfg.guard_window
        nan = torch.full_like(norms, float("nan"))
        self.norm_hist[self.pos % w] = torch.where(accept, norms, nan)
        self.loss_hist[self.pos % w] = torch.where(accept, loss.float(), nan[0])
        self.pos += 1
        hit = spikes | rollback
        self.scale = torch.where(hit, self.scale * 0.5, self.scale)
        cooling = self.cooldown > 0
        self.cooldown = torch.where(
            hit, torch.full_like(self.cooldown, cfg.guard_cooldown), self.cooldown - cooling.long()
        )
        done = cooling & (self.cooldown == 0) & ~hit
        self.scale = torch.where(done, torch.ones_like(self.scale), self.scale)

    # ----------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Momentum buffers and guard state, for a bit-identical resume."""
        t = {f"momentum.{k}": v for k, v in self.momentum.items()}
        if self.guard:
            t.update(
                {
                    "guard.norm_hist": self.norm_hist,
                    "guard.loss_hist": self.loss_hist,
                    "guard.scale": self.scale,
                    "guard.cooldown": self.cooldown,
                    "guard.prev_valid": self.prev_valid,
                    "guard.pos": torch.tensor(self.pos),
                }
            )
            t.update({f"guard.prev.{k}": v for k, v in self.prev.items()})
        return t

    def load_state_tensors(self, t: dict[str, torch.Tensor]) -> None:
        dev = self.device
        self.momentum = {
            k[9:]: v.to(dev, self.params[k[9:]].dtype)
            for k, v in t.items()
            if k.startswith("momentum.")
        }
        if self.guard and "guard.pos" in t:
            self.norm_hist = t["guard.norm_hist"].to(dev)
            self.loss_hist = t["guard.loss_hist"].to(dev)
            self.scale = t["guard.scale"].to(dev)
            self.cooldown = t["guard.cooldown"].to(dev)
            self.prev_valid = t["guard.prev_valid"].to(dev)
            self.pos = int(t["guard.pos"])
            self.prev = {k[11:]: v.to(dev) for k, v in t.items() if k.startswith("guard.prev.")}
