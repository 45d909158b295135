"""What each stage runs (one component call) and what it records in MLflow (through components.tracking): one module
per stage, so a stage's fingerprint and its dvc.yaml deps name its own glue and not the other stages'
(``flows.stages.stage_code``). Each module has ``run(ctx, inp, out)`` and ``log(ctx, inp, summary, out)``."""
