"""The distillation engine: the outer loop, the unroll and what they hold.

* :mod:`.distill` — the outer distillation loop, :class:`~.distill.Distiller`;
* :mod:`.distill_state` — the Distiller's resumable state and run folder;
* :mod:`.checkpoint` — resumable checkpoints, the run folder's files and their records;
* :mod:`.sampling` — the outer loop's random draws, from one seeded host generator;
* :mod:`.step_plan` — one iteration's draws as the unroll reads them
(:class:`~.step_plan.StepPlan`);
* :mod:`.unroll` — the T-step student unroll and its meta-gradients (:class:`~.unroll.Unroller`);
* :mod:`.unroll_settings` — the unroll's settings and result types;
* :mod:`.memory_plan` — how one iteration holds the shared encoder graph under a memory budget;
* :mod:`.outer` — the outer optimiser (SGD with momentum, the guard against spikes);
* :mod:`.similarity` — the learned soft similarity targets (low-rank and full);
* :mod:`.guard_report` — what the guard did in a run;
* :mod:`.transfer` — host-to-device transfers that never block the host;
* :mod:`.ranges` — named ranges of the engine's phases, read by the profiler.

It builds on the package's lower layers (config, methods, models, ops, experts, io) and nothing
here imports the command line, the benchmarks, evaluation or the reports. Nothing is imported
at package import time: ``import repblend_fast.engine.unroll`` loads what it needs.
"""
