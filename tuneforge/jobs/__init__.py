"""Declarative training jobs (SFT, DPO, RL, distillation, atomic batches) that run through a
tuneforge server's public Tinker API with the `tinker` SDK and the cookbook's renderers.

    spec.py        the options every job shares; parsing a config (YAML or JSON)
    registry.py    the job types by name; each type's module (sft, dpo, rl, distill, atomic)
                   declares its spec, rows, run, evaluation and preview (jobtype.py)
    loop.py        the shared training loop; supervised.py the cross-entropy path on chats
    rundir.py      the experiment folder; context.py a running job; model.py base-model facts
    runner.py      preflight and dispatch; report.py evaluation afterwards
    schema.py, preview.py   what the console shows before a job runs
    host.py        the interface through which a server hosts jobs (its only import from here)
    cli.py         `tuneforge train` and `tuneforge jobs`

This package imports nothing from tuneforge.server: it is a client like any other.
"""
