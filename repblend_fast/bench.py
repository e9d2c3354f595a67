"""Step benchmark and step profiler: the library side of ``repblend-fast bench`` / ``profile``.

:func:`run_bench` times one distillation iteration (median ms over timed iterations after warm-up)
and its peak memory for, on the same inputs:

* ``lors-authors``: the LoRS algorithm as its authors run it (eager fp32, the image encoder is the
  student, TESLA two passes re-encoding every step, a fresh model copy and flat copies of the
  expert snapshots every iteration);
* ``repblend-authors``: the RepBlend algorithm as its authors run it (eager fp32, TESLA, the frozen
  encoder run on every step's batch in both passes);
* ``repblend-fast``: :class:`repblend_fast.unroll.Unroller` with ``share_encoder=True``, expert
  snapshots preloaded on the device, bf16 autocast of the encoder on a GPU; reported separately for
  ``meta_grad="exact"`` and ``"tesla"`` (``repblend-fast:exact`` / ``repblend-fast:tesla`` pick
  one);
* ``lors-fast`` (optional): the LoRS algorithm through the Unroller (TESLA).

The two ``-authors`` baselines live in the source checkout (``benchmarks/baselines/authors.py``);
from an installed wheel without it they are skipped with that reason.

Memory: on a GPU, ``peak_mib`` is ``max_memory_allocated`` during the warm-up and timed iterations
minus the memory allocated before them (model, synthetic data and snapshots), and
``peak_total_mib`` the absolute maximum. On a CPU each provider runs in a fresh subprocess (so one
provider's allocator state cannot hide another's); ``peak_total_mib`` is the peak resident set
(``VmHWM``) of that process after setup, reset through ``/proc/self/clear_refs`` just before the
first iteration, and ``peak_mib`` that minus the resident set at the same moment: the memory the
iterations themselves add (``setup_mib`` is the resident set before them).

:func:`run_profile` runs the fast path with :class:`repblend_fast.profiling.ProfiledUnroller` and
reports per-phase time and memory (optionally a ``torch.profiler`` chrome trace).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from repblend_fast.models.flat import FlatSpec
from repblend_fast.models.heads import HeadSpec, init_head_flat
from repblend_fast.unroll import StepPlan, Unroller, UnrollSettings, make_unroller_for_lors

__all__ = [
    "DEFAULT_PROVIDERS",
    "SHAPE_SETS",
    "StepShape",
    "build_step_inputs",
    "format_step_table",
    "machine_info",
    "main_bench",
    "main_profile",
    "run_bench",
    "run_profile",
]

PROVIDERS = ("lors-authors", "repblend-authors", "repblend-fast", "lors-fast")
DEFAULT_PROVIDERS = ("lors-authors", "repblend-authors", "repblend-fast")
_RESULT_TAG = "@@repblend-bench-result "
# Parity of the fp32 fast path with the authors-style loop on the benchmark's own first plan:
# relative L2 error of each meta-gradient (both sides fp32, different summation orders over T=8
# steps; float64 agreement to 1e-8 is tested in tests/test_baselines.py).
PARITY_RTOL = 2e-3


# --------------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class StepShape:
    """One step-benchmark configuration (SPEC.md §1 notation)."""

    name: str
    encoder: str  # "tiny" or a timm model name (random init)
    image_size: int
    d_txt: int
    dim: int  # head width D of the RepBlend heads
    pairs: int  # N
    batch: int  # B
    steps: int  # T
    rank: int = 10
    alpha: float = 3.0
    # The stand-in trajectories are random, so the paper's learning rates (100-1000 on the data)
    # would overflow within a few iterations; timing does not depend on these values.
    lr_img: float = 1.0
    lr_txt: float = 1.0
    lr_sim: float = 1.0
    lr_lr: float = 1e-3

    def describe(self) -> str:
        return (
            f"{self.encoder} @{self.image_size}px, N={self.pairs}, B={self.batch}, T={self.steps}, "
            f"d_t={self.d_txt}, D={self.dim}"
        )


SHAPE_SETS: dict[str, list[StepShape]] = {
    # Unit-test size: a two-layer conv encoder, seconds on one core.
    "tiny": [StepShape("tiny", "tiny", 8, 12, 16, 11, 4, 2, rank=2, alpha=1.0)],
    # The authors' setting shrunk for a CPU (DESIGN.md §5): the outside anchor is measured here.
    "ci": [StepShape("ci-resnet18-64", "resnet18", 64, 768, 512, 99, 20, 8)],
    # RepBlend's paper sizes (SPEC.md §1; rank and alpha of flickr-100 and flickr-500).
    "paper": [
        StepShape("paper-n99", "nfnet_l0", 224, 768, 2304, 99, 20, 8),
        StepShape(
            "paper-n499",
            "nfnet_l0",
            224,
            768,
            2304,
            499,
            20,
            8,
            rank=20,
            alpha=0.01,
        ),
    ],
    "scale": [
        StepShape("scale-n999", "nfnet_l0", 224, 768, 2304, 999, 20, 8, rank=40, alpha=1.0),
        StepShape("scale-n1999-b40", "nfnet_l0", 224, 768, 2304, 1999, 40, 8, rank=40, alpha=1.0),
    ],
}


class TinyEncoder(nn.Module):
    """Two convolutions and global pooling: the ``tiny`` shape set's stand-in for a timm model."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, width, 3, padding=1)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.conv1(x))
        return torch.nn.functional.gelu(self.conv2(h)).mean((-1, -2))


def make_encoder(shape: StepShape, seed: int = 0) -> nn.Module:
    """A randomly initialised encoder in eval mode (timm, pooled features; no download)."""
    torch.manual_seed(seed)
    if shape.encoder == "tiny":
        enc = TinyEncoder()
    else:
        import timm

        enc = timm.create_model(shape.encoder, pretrained=False, num_classes=0)
    return enc.eval()


# --------------------------------------------------------------------------------------------------
# inputs


@dataclass
class StepInputs:
    """Everything a provider needs, identical for all providers of one configuration.

    Snapshots are host tensors (the authors' loops copy them to the device every iteration; the
    fast path preloads them once).
    """

    shape: StepShape
    encoder: nn.Module
    d_feat: int
    images: torch.Tensor  # [N, 3, H, W]
    texts: torch.Tensor  # [N, d_t]
    sim: dict[str, torch.Tensor]  # low-rank a [N], L [N, r], R [N, r]
    repblend: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    lors: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    plans_repblend: list[StepPlan]
    plans_lors: list[StepPlan]


def _plans(shape: StepShape, count: int, blend: bool, g: torch.Generator) -> list[StepPlan]:
    from repblend_fast.distill import BatchSampler

    sampler = BatchSampler(shape.pairs, shape.batch, g)
    out = []
    for _ in range(count):
        batches = torch.stack([sampler.next() for _ in range(shape.steps)])
        if blend:
            lams = torch.rand(shape.steps, generator=g)  # Beta(1, 1)
            perms = torch.stack(
                [torch.randperm(shape.batch, generator=g) for _ in range(shape.steps)]
            )
        else:
            lams = torch.ones(shape.steps)
            perms = torch.arange(shape.batch).expand(shape.steps, shape.batch).clone()
        out.append(StepPlan(batches, lams, perms))
    return out


def build_step_inputs(
    shape: StepShape, count: int, seed: int = 0, methods: tuple[str, ...] = ("repblend", "lors")
) -> StepInputs:
    """Random stand-ins of the data, one expert's epochs 0 and 1, and ``count`` plans per method."""
    g = torch.Generator().manual_seed(seed)
    enc = make_encoder(shape, seed)
    for p in enc.parameters():
        p.requires_grad_(False)
    n, res = shape.pairs, shape.image_size
    images = torch.randn(n, 3, res, res, generator=g)
    texts = torch.randn(n, shape.d_txt, generator=g)
    with torch.no_grad():
        d_feat = int(enc(images[:2]).shape[-1])
    sim = {
        "a": torch.ones(n),
        "L": torch.randn(n, shape.rank, generator=g),
        "R": torch.zeros(n, shape.rank),
    }

    def epochs(start: tuple[torch.Tensor, torch.Tensor]):
        target = tuple(t + 1e-2 * torch.randn(t.shape, generator=g) for t in start)
        return start, target

    repblend = lors = None
    if "repblend" in methods:
        repblend = epochs(
            (
                init_head_flat(d_feat, shape.dim, generator=g),
                init_head_flat(shape.d_txt, shape.dim, generator=g),
            )
        )
    if "lors" in methods:
        enc_flat = FlatSpec.from_module(enc, trainable_only=False).flatten(enc).clone()
        lors = epochs((enc_flat, init_head_flat(shape.d_txt, d_feat, generator=g)))
    plans_rb = _plans(shape, count, True, torch.Generator().manual_seed(seed + 1))
    plans_lors = _plans(shape, count, False, torch.Generator().manual_seed(seed + 2))
    return StepInputs(shape, enc, d_feat, images, texts, sim, repblend, lors, plans_rb, plans_lors)


# --------------------------------------------------------------------------------------------------
# providers


def _import_baselines():
    """``benchmarks.baselines.authors`` from the source checkout, or ``(None, reason)``."""
    try:
        from benchmarks.baselines import authors

        return authors, ""
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[1]
    if (root / "benchmarks" / "baselines" / "authors.py").is_file():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from benchmarks.baselines import authors

        return authors, ""
    return None, "the authors-style baselines live in a source checkout (benchmarks/baselines/)"


def _to(plan: StepPlan, device: torch.device) -> StepPlan:
    return StepPlan(plan.batches.to(device), plan.lams.to(device), plan.perms.to(device))


class FastRunner:
    """repblend_fast's path: Unroller + SGD-momentum, snapshots preloaded on the device."""

    def __init__(
        self,
        inputs: StepInputs,
        method: str,
        meta_grad: str,
        device: torch.device,
        autocast: torch.dtype | None,
        timer=None,
    ):
        from repblend_fast.similarity import LowRankSimilarity

        sh = inputs.shape
        self.provider = f"{method}-fast"
        self.meta_grad = meta_grad
        self.device = device
        self.timer = timer
        self.method = method
        self.encoder = inputs.encoder.to(device)
        settings = UnrollSettings(
            method=method,
            meta_grad=meta_grad,
            share_encoder=True,
            encoder_autocast=autocast,
            encoder_chunk=encoder_chunk(),
        )
        sim = LowRankSimilarity(sh.pairs, sh.rank, sh.alpha, device=device)
        if method == "repblend":
            cls = Unroller
            if timer is not None:
                from repblend_fast.profiling import ProfiledUnroller

                cls = ProfiledUnroller
            specs = (HeadSpec(inputs.d_feat, sh.dim), HeadSpec(sh.d_txt, sh.dim))
            kw = {"timer": timer} if timer is not None else {}
            self.unroller = cls(settings, self.encoder, *specs, sim, **kw)
            snaps = inputs.repblend
            self.plans = inputs.plans_repblend
        else:
            txt = HeadSpec(sh.d_txt, inputs.d_feat)
            self.unroller = make_unroller_for_lors(settings, self.encoder, txt, sim)
            snaps = inputs.lors
            self.plans = inputs.plans_lors
        self.start = tuple(t.to(device) for t in snaps[0])
        self.target = tuple(t.to(device) for t in snaps[1])
        self.x = inputs.images.to(device).clone()
        self.y = inputs.texts.to(device).clone()
        self.eta_img = torch.tensor(0.1, device=device)
        self.eta_txt = torch.tensor(0.1, device=device)
        self.sim = {k: v.to(device).clone() for k, v in inputs.sim.items()}
        self.momentum: dict[str, torch.Tensor] = {}
        self.lrs = {"x": sh.lr_img, "y": sh.lr_txt, "eta_img": sh.lr_lr, "eta_txt": sh.lr_lr}
        self.lrs.update({f"sim.{k}": sh.lr_sim for k in self.sim})

    def _phase(self, name: str):
        return self.timer.phase(name) if self.timer is not None else nullcontext()

    def grads(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        plan = _to(plan, self.device)
        r = self.unroller.run(
            self.x, self.y, self.sim, self.eta_img, self.eta_txt, self.start, self.target, plan
        )
        return r.grads

    def iteration(self, i: int) -> float:
        with self._phase("io"):
            plan = _to(self.plans[i], self.device)
            start, target = self.start, self.target
        r = self.unroller.run(
            self.x, self.y, self.sim, self.eta_img, self.eta_txt, start, target, plan
        )
        with self._phase("optimiser"):
            params = {"x": self.x, "y": self.y, "eta_img": self.eta_img, "eta_txt": self.eta_txt}
            params.update({f"sim.{k}": v for k, v in self.sim.items()})
            with torch.no_grad():
                for name, p in params.items():
                    g = r.grads[name].to(p.dtype)
                    buf = self.momentum.get(name)
                    buf = g.clone() if buf is None else buf.mul_(0.5).add_(g)
                    self.momentum[name] = buf
                    p.sub_(self.lrs[name] * buf)
        return float(r.loss)


class AuthorsRunner:
    """One of the authors-style baselines behind the runner interface."""

    def __init__(self, inputs: StepInputs, method: str, device: torch.device):
        import copy

        authors, why = _import_baselines()
        if authors is None:
            raise RuntimeError(why)
        sh = inputs.shape
        self.provider = f"{method}-authors"
        self.meta_grad = "tesla"
        self.device = device
        settings = authors.AuthorsSettings(
            lr_img=sh.lr_img, lr_txt=sh.lr_txt, lr_lr=sh.lr_lr, lr_sim=sh.lr_sim
        )
        enc = copy.deepcopy(inputs.encoder).cpu()
        if method == "repblend":
            model = authors.RepBlendModel(enc, inputs.d_feat, sh.d_txt, sh.dim)
            snaps, cls = inputs.repblend, authors.RepBlendAuthors
            parts = (model.image_head, model.text_head)
            self.plans = inputs.plans_repblend
        else:
            model = authors.LoRSModel(enc, sh.d_txt, inputs.d_feat)
            snaps, cls = inputs.lors, authors.LoRSAuthors
            parts = (model.image_encoder, model.text_head)
            self.plans = inputs.plans_lors
        buffer = {
            "image": [authors.split_pieces(parts[0], s[0]) for s in snaps],
            "text": [authors.split_pieces(parts[1], s[1]) for s in snaps],
        }
        sim = authors.LowRankSim(sh.pairs, sh.rank, sh.alpha).load_params(inputs.sim)
        self.loop = cls(model, inputs.images, inputs.texts, sim, buffer, settings, device)

    def grads(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        self.loop.optimizer.zero_grad(set_to_none=True)
        self.loop.meta_grads(_to(plan, self.device))
        return {k: v.detach().clone() for k, v in self.loop.grads().items() if v is not None}

    def iteration(self, i: int) -> float:
        return self.loop.iteration(_to(self.plans[i], self.device))


def _parse_providers(providers) -> list[tuple[str, str]]:
    """``"a,b"`` or a list -> ``[(provider, meta_grad)]``; ``repblend-fast`` means both modes."""
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    runs: list[tuple[str, str]] = []
    for p in providers:
        name, _, mode = p.partition(":")
        if name not in PROVIDERS:
            raise ValueError(f"unknown provider {name!r}: choose from {', '.join(PROVIDERS)}")
        if name.endswith("-authors"):
            if mode not in ("", "tesla"):
                raise ValueError(f"{name} runs TESLA only (the authors' method), got :{mode}")
            modes = ["tesla"]
        elif mode:
            if mode not in ("exact", "tesla"):
                raise ValueError(f"meta-gradient mode must be exact or tesla, got {p!r}")
            modes = [mode]
        else:
            modes = ["exact", "tesla"] if name == "repblend-fast" else ["tesla"]
        runs += [(name, m) for m in modes if (name, m) not in runs]
    if not runs:
        raise ValueError("no providers given")
    return runs


def make_runner(inputs: StepInputs, provider: str, meta_grad: str, device, timer=None):
    """Build the runner of ``provider`` (``autocast`` bf16 for the fast path on CUDA)."""
    device = torch.device(device)
    method = provider.split("-")[0]
    if provider.endswith("-authors"):
        return AuthorsRunner(inputs, method, device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    return FastRunner(inputs, method, meta_grad, device, autocast, timer)


# --------------------------------------------------------------------------------------------------
# measurement


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available: use --device cpu")
    return dev


def _median(v: list[float]) -> float:
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def measure(runner, warmup: int, iterations: int, device: torch.device) -> dict:
    """Warm-up then timed iterations of ``runner``: per-iteration ms and memory (module doc)."""
    from repblend_fast.profiling import reset_rss_peak, rss_mib, rss_peak_mib

    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        setup = torch.cuda.memory_allocated(device) / 2**20
        method = "cuda max_memory_allocated"
    else:
        setup = rss_mib()
        method = "peak RSS (VmHWM) after setup" if reset_rss_peak() else "peak RSS (ru_maxrss)"
    ms, losses = [], []
    for i in range(warmup + iterations):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            losses.append(runner.iteration(i))
            b.record()
            torch.cuda.synchronize(device)
            t = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            losses.append(runner.iteration(i))
            t = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            ms.append(t)
    if cuda:
        total = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        total = rss_peak_mib()
    return {
        "ms_per_iter": _median(ms),
        "ms_all": ms,
        "peak_mib": max(0.0, total - setup),
        "peak_total_mib": total,
        "setup_mib": setup,
        "memory_method": method,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_parity(inputs: StepInputs, runs, device: torch.device) -> dict[str, float]:
    """Meta-gradients of each authors baseline vs the fp32 fast TESLA path on the first plan.

    Returns ``{provider: max relative L2 error}``; raises when one exceeds ``PARITY_RTOL``.
    """
    errs: dict[str, float] = {}
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for provider, _ in runs:
            if not provider.endswith("-authors"):
                continue
            method = provider.split("-")[0]
            ref = AuthorsRunner(inputs, method, device)
            want = ref.grads(ref.plans[0])
            del ref
            fast = FastRunner(inputs, method, "tesla", device, None)
            got = fast.grads(fast.plans[0])
            del fast
            errs[provider] = max(_rel_err(got[k], want[k]) for k in want)
            if not errs[provider] <= PARITY_RTOL:
                bad = {k: _rel_err(got[k], want[k]) for k in want}
                raise RuntimeError(
                    f"parity failed for {provider} vs {method}-fast (tesla) on "
                    f"{inputs.shape.name}: "
                    f"relative errors {bad} exceed {PARITY_RTOL}; no speed is reported"
                )
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return errs


# --------------------------------------------------------------------------------------------------
# machine description


def git_sha(root: str | os.PathLike | None = None) -> str:
    """Short sha of the checkout (``+dirty`` if tracked files changed); ``unknown`` outside git."""
    root = root or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Versions and hardware for a results file (DESIGN.md §5)."""
    device = torch.device(device)
    info = {
        "device": device.type,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


# --------------------------------------------------------------------------------------------------
# run_bench


def encoder_chunk() -> int:
    """The fast path's ``encoder_chunk``: the DistillConfig default, or
    ``REPBLEND_BENCH_ENCODER_CHUNK`` (0 keeps the encoder graph over all touched images)."""
    from repblend_fast.config import DistillConfig

    default = DistillConfig.__dataclass_fields__["encoder_chunk"].default
    return int(os.environ.get("REPBLEND_BENCH_ENCODER_CHUNK", default))


def _run_one(
    shape: StepShape,
    provider: str,
    meta_grad: str,
    device: torch.device,
    seed: int,
    warmup: int,
    iterations: int,
) -> dict:
    method = provider.split("-")[0]
    inputs = build_step_inputs(shape, warmup + iterations, seed, methods=(method,))
    runner = make_runner(inputs, provider, meta_grad, device)
    del inputs
    out = measure(runner, warmup, iterations, device)
    out["autocast"] = "bf16" if (provider.endswith("-fast") and device.type == "cuda") else "none"
    if provider == "repblend-fast":
        out["encoder_chunk"] = encoder_chunk()
    del runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _run_subprocess(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "repblend_fast.bench", "--worker", json.dumps(spec)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG) :])
    raise RuntimeError(
        f"benchmark worker for {spec['provider']}:{spec['meta_grad']} failed "
        f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    )


def _worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    shape = StepShape(**spec["shape"])
    out = _run_one(
        shape,
        spec["provider"],
        spec["meta_grad"],
        torch.device(spec["device"]),
        spec["seed"],
        spec["warmup"],
        spec["iterations"],
    )
    print(_RESULT_TAG + json.dumps(out), flush=True)


def _add_ratios(records: list[dict]) -> None:
    by_cfg: dict[str, dict[str, dict]] = {}
    for r in records:
        if r.get("provider") == "repblend-fast" and "ms_per_iter" in r:
            by_cfg.setdefault(r["config"], {})[r["meta_grad"]] = r
    for r in records:
        for mode, ref in by_cfg.get(r["config"], {}).items():
            if "ms_per_iter" not in r:
                continue
            r[f"time_ratio_to_fast_{mode}"] = r["ms_per_iter"] / ref["ms_per_iter"]
            # A sub-MiB reference (tiny shapes) has no meaningful memory ratio.
            if ref["peak_mib"] >= 1.0:
                r[f"mem_ratio_to_fast_{mode}"] = r["peak_mib"] / ref["peak_mib"]


def run_bench(
    shapes: str = "ci",
    json_path: str | None = None,
    providers: str | list[str] | tuple[str, ...] = DEFAULT_PROVIDERS,
    iterations: int | None = None,
    device: str = "auto",
    *,
    warmup: int | None = None,
    isolate: str = "auto",
    parity: bool = True,
    seed: int = 0,
    threads: int | None = None,
    timeout: float = 3600.0,
    verbose: bool = True,
) -> list[dict]:
    """Time one distillation iteration per provider and meta-gradient mode.

    Args:
        shapes: a :data:`SHAPE_SETS` name (``tiny``, ``ci``, ``paper``, ``scale``).
        json_path: write the records there as a JSON list (parent folders are created).
        providers: names from ``lors-authors, repblend-authors, repblend-fast, lors-fast``
            (``name:exact`` / ``name:tesla`` pick one mode), a list or a comma-separated string.
        iterations: timed iterations (default 2 on CPU, 5 on GPU) after ``warmup`` (1 / 2).
        device: ``auto``, ``cpu`` or ``cuda``.
        isolate: ``subprocess`` (a fresh process per provider: honest CPU peak RSS), ``inprocess``,
            or ``auto`` (subprocess on CPU, in-process on GPU where allocator stats are exact).
        parity: first check the baselines' meta-gradients against the fp32 fast path.
        seed: seeds the random stand-in data, snapshots and plans (same for every provider).
        threads: CPU threads for torch (default: torch's choice); on a shared machine 1 thread
            avoids OpenMP barriers stalling behind other processes.
        timeout: seconds per subprocess.
        verbose: print the table.

    Returns:
        One record per (configuration, provider, meta_grad) with ``provider``, ``meta_grad``,
        ``shapes``, ``config``, ``shape``, ``ms_per_iter``, ``ms_all``, ``peak_mib``,
        ``peak_total_mib``, ``setup_mib``, ``memory_method``, ratios to ``repblend-fast``, and the
        machine description (``device``, ``cpu``, ``gpu``, ``torch``, ``git_sha``, ...); a provider
        that cannot run has ``skipped`` with the reason instead of timings.
    """
    if shapes not in SHAPE_SETS:
        raise ValueError(f"shapes must be one of {', '.join(SHAPE_SETS)}, got {shapes!r}")
    if isolate not in ("auto", "subprocess", "inprocess"):
        raise ValueError(f"isolate must be auto, subprocess or inprocess, got {isolate!r}")
    dev = _resolve_device(device)
    runs = _parse_providers(providers)
    cuda = dev.type == "cuda"
    iterations = iterations if iterations is not None else (5 if cuda else 2)
    warmup = warmup if warmup is not None else (2 if cuda else 1)
    if iterations < 1 or warmup < 0:
        raise ValueError("need iterations >= 1 and warmup >= 0")
    mode = isolate if isolate != "auto" else ("inprocess" if cuda else "subprocess")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        records = _bench_all(
            shapes, runs, dev, mode, iterations, warmup, parity, seed, threads, timeout, verbose
        )
    finally:
        torch.set_num_threads(old_threads)
    _add_ratios(records)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    if verbose:
        print(format_step_table(records))
    return records


def _bench_all(
    shapes, runs, dev, mode, iterations, warmup, parity, seed, threads, timeout, verbose
) -> list[dict]:
    info = machine_info(dev)
    _, no_baselines = _import_baselines()
    records: list[dict] = []
    for shape in SHAPE_SETS[shapes]:
        todo = [(p, m) for p, m in runs if not (p.endswith("-authors") and no_baselines)]
        errs: dict[str, float] = {}
        if parity and any(p.endswith("-authors") for p, _ in todo):
            methods = tuple({p.split("-")[0] for p, _ in todo if p.endswith("-authors")})
            inputs = build_step_inputs(shape, 1, seed, methods=methods)
            errs = check_parity(inputs, todo, dev)
            del inputs
            gc.collect()
        for provider, meta_grad in runs:
            rec = {
                "provider": provider,
                "meta_grad": meta_grad,
                "shapes": shapes,
                "config": shape.name,
                "shape": asdict(shape),
                "isolation": mode,
                "iterations": iterations,
                "warmup": warmup,
                **info,
            }
            if (provider, meta_grad) not in todo:
                rec["skipped"] = no_baselines
                records.append(rec)
                continue
            if provider in errs:
                rec["parity_rel_err"] = errs[provider]
            if verbose:
                print(f"[bench] {shape.name}: {provider} ({meta_grad}) ...", file=sys.stderr)
            if mode == "subprocess":
                spec = {
                    "shape": asdict(shape),
                    "provider": provider,
                    "meta_grad": meta_grad,
                    "device": str(dev),
                    "seed": seed,
                    "warmup": warmup,
                    "iterations": iterations,
                    "threads": threads,
                }
                out = _run_subprocess(spec, timeout)
            else:
                out = _run_one(shape, provider, meta_grad, dev, seed, warmup, iterations)
            rec.update(out)
            records.append(rec)
    return records


def format_step_table(records: list[dict]) -> str:
    """Markdown table: ms/iteration, peak MiB and ratios to ``repblend-fast`` per configuration."""
    lines: list[str] = []
    configs = list(dict.fromkeys(r["config"] for r in records))
    for cfg in configs:
        rows = [r for r in records if r["config"] == cfg]
        r0 = rows[0]
        dev = r0.get("gpu") or f"{r0.get('cpu')} ({r0.get('cpu_count')} cores)"
        shape = StepShape(**r0["shape"]).describe() if "shape" in r0 else cfg
        lines.append(
            f"**{cfg}** — {shape}; {r0.get('device')}: {dev}; torch {r0.get('torch')}, "
            f"git {r0.get('git_sha')}; {r0.get('memory_method', '')}"
        )
        lines.append("")
        lines.append(
            "| provider | meta-grad | ms/iter | peak MiB (iteration) | peak MiB (total) "
            "| time ÷ fast-exact | time ÷ fast-tesla | mem ÷ fast-exact | mem ÷ fast-tesla |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if "ms_per_iter" not in r:
                lines.append(
                    f"| {r['provider']} | {r['meta_grad']} | skipped: {r.get('skipped')} "
                    "| | | | | | |"
                )
                continue

            def ratio(key: str, r=r) -> str:
                v = r.get(key)
                return f"{v:.2f}×" if v is not None else "–"

            lines.append(
                f"| {r['provider']} | {r['meta_grad']} | {r['ms_per_iter']:.1f} | "
                f"{r['peak_mib']:.0f} | {r['peak_total_mib']:.0f} | "
                f"{ratio('time_ratio_to_fast_exact')} | {ratio('time_ratio_to_fast_tesla')} | "
                f"{ratio('mem_ratio_to_fast_exact')} | {ratio('mem_ratio_to_fast_tesla')} |"
            )
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# run_profile


def run_profile(
    shapes: str = "ci",
    provider: str = "repblend-fast",
    meta_grad: str = "tesla",
    iterations: int = 3,
    device: str = "auto",
    *,
    warmup: int = 1,
    trace: str | None = None,
    json_path: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    verbose: bool = True,
) -> dict:
    """Per-phase time and peak memory of the fast path's distillation step.

    Phases: ``io``, ``encoder_forward``, ``unroll``, ``meta_gradient``, ``encoder_vjp``,
    ``optimiser`` (exclusive times; ``other`` is the rest of the step). Each configuration of the
    shape set gets a summary (medians over ``iterations`` steps after ``warmup``) and the raw
    per-step profiles. ``trace``: write a ``torch.profiler`` chrome trace of the timed steps of
    the first configuration there. ``threads``: torch CPU threads (default: torch's choice).
    """
    if shapes not in SHAPE_SETS:
        raise ValueError(f"shapes must be one of {', '.join(SHAPE_SETS)}, got {shapes!r}")
    if provider != "repblend-fast":
        raise ValueError("run_profile profiles provider='repblend-fast' (the phased Unroller path)")
    if meta_grad not in ("exact", "tesla"):
        raise ValueError(f"meta_grad must be exact or tesla, got {meta_grad!r}")
    if iterations < 1 or warmup < 0:
        raise ValueError("need iterations >= 1 and warmup >= 0")
    dev = _resolve_device(device)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _profile_all(
            shapes, provider, meta_grad, iterations, dev, warmup, trace, json_path, seed, verbose
        )
    finally:
        torch.set_num_threads(old_threads)


def _profile_all(
    shapes, provider, meta_grad, iterations, dev, warmup, trace, json_path, seed, verbose
) -> dict:
    from repblend_fast.profiling import PhaseTimer, format_profile_table, summarise_profiles

    info = machine_info(dev)
    info["threads"] = torch.get_num_threads()
    result = {"provider": provider, "meta_grad": meta_grad, "shapes": shapes, **info, "configs": []}
    tables = []
    for k, shape in enumerate(SHAPE_SETS[shapes]):
        inputs = build_step_inputs(shape, warmup + iterations, seed, methods=("repblend",))
        timer = PhaseTimer(dev)
        runner = make_runner(inputs, provider, meta_grad, dev, timer=timer)
        for i in range(warmup):
            runner.iteration(i)
        want_trace = trace is not None and k == 0
        prof_ctx = nullcontext()
        if want_trace:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if dev.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            prof_ctx = torch.profiler.profile(activities=acts)
        with prof_ctx as prof:
            for i in range(warmup, warmup + iterations):
                with timer.step():
                    runner.iteration(i)
        if want_trace:
            Path(trace).parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(trace))
        summary = summarise_profiles(timer.steps)
        mem = "peak MiB" if dev.type == "cuda" else "peak RSS MiB"
        title = f"{shape.name} — {shape.describe()}; {provider} ({meta_grad}) on {dev.type}"
        tables.append(format_profile_table(summary, title, mem))
        result["configs"].append(
            {
                "config": shape.name,
                "shape": asdict(shape),
                "memory": "cuda max_memory_allocated" if dev.type == "cuda" else "process RSS",
                "summary": summary,
                "steps": [s.to_dict() for s in timer.steps],
            }
        )
        del runner, inputs
        gc.collect()
    if trace is not None:
        result["trace"] = str(trace)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if verbose:
        print("\n\n".join(tables))
    return result


# --------------------------------------------------------------------------------------------------
# command-line entry points (mounted as `repblend-fast bench` / `repblend-fast profile`)


def bench_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="repblend-fast bench", description="Time one distillation iteration per provider."
    )
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="ci")
    p.add_argument("--json", dest="json_path", default=None, help="write the records here")
    p.add_argument(
        "--providers",
        default=",".join(DEFAULT_PROVIDERS),
        help=f"comma-separated from {', '.join(PROVIDERS)} (name:exact / name:tesla for one mode)",
    )
    p.add_argument("--iterations", type=int, default=None, help="timed iterations (CPU 2, GPU 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (CPU 1, GPU 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--isolate", choices=("auto", "subprocess", "inprocess"), default="auto")
    p.add_argument(
        "--no-parity",
        dest="parity",
        action="store_false",
        help="skip the gradient parity check against the baselines",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def profile_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="repblend-fast profile",
        description="Per-phase time and memory of a distillation step.",
    )
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="ci")
    p.add_argument(
        "--config",
        default=None,
        help="a DistillConfig JSON (e.g. a run's config.json): its pairs, batch size, unroll "
        "steps, similarity rank/alpha, meta-gradient and encoder_chunk replace the shape set's",
    )
    p.add_argument("--meta-grad", choices=("exact", "tesla"), default=None, help="default tesla")
    p.add_argument(
        "--iterations", "--steps", dest="iterations", type=int, default=3, help="profiled steps"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--trace", default=None, help="write a torch.profiler chrome trace here")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main_bench(argv: list[str] | None = None) -> int:
    a = bench_parser().parse_args(argv)
    run_bench(
        a.shapes,
        a.json_path,
        a.providers,
        a.iterations,
        a.device,
        warmup=a.warmup,
        isolate=a.isolate,
        parity=a.parity,
        seed=a.seed,
        threads=a.threads,
    )
    return 0


def shapes_from_config(shapes: str, config_path: str) -> tuple[str, str]:
    """Register the shape set ``shapes`` with a DistillConfig file's sizes applied; returns the
    new set's name and the config's meta-gradient (its ``encoder_chunk`` goes to the env)."""
    import dataclasses

    from repblend_fast.config import DistillConfig

    with open(config_path, encoding="utf-8") as fh:
        cfg = DistillConfig.from_dict(json.load(fh)).validate()
    name = f"{shapes}+config"
    SHAPE_SETS[name] = [
        dataclasses.replace(
            sh,
            name=f"{sh.name}+config",
            pairs=cfg.pairs,
            batch=cfg.batch_size,
            steps=cfg.syn_steps,
            rank=cfg.sim_rank,
            alpha=cfg.sim_alpha,
        )
        for sh in SHAPE_SETS[shapes]
    ]
    os.environ["REPBLEND_BENCH_ENCODER_CHUNK"] = str(cfg.encoder_chunk)
    return name, cfg.meta_grad


def main_profile(argv: list[str] | None = None) -> int:
    a = profile_parser().parse_args(argv)
    shapes, meta_grad = a.shapes, a.meta_grad
    saved_chunk = os.environ.get("REPBLEND_BENCH_ENCODER_CHUNK")
    try:
        if a.config is not None:
            try:
                shapes, cfg_meta = shapes_from_config(a.shapes, a.config)
            except (OSError, ValueError, TypeError) as exc:
                print(f"repblend-fast profile: error: --config {a.config}: {exc}", file=sys.stderr)
                return 2
            meta_grad = meta_grad or cfg_meta
        run_profile(
            shapes,
            "repblend-fast",
            meta_grad or "tesla",
            a.iterations,
            a.device,
            warmup=a.warmup,
            trace=a.trace,
            json_path=a.json_path,
            seed=a.seed,
            threads=a.threads,
        )
    finally:
        if saved_chunk is None:
            os.environ.pop("REPBLEND_BENCH_ENCODER_CHUNK", None)
        else:
            os.environ["REPBLEND_BENCH_ENCODER_CHUNK"] = saved_chunk
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "profile":
        sys.exit(main_profile(sys.argv[2:]))
    sys.exit(main_bench(sys.argv[1:]))
