"""What each stage runs: one module per stage, ``run(ctx, inp, out)`` (one component call) and what else the stage
table needs from it. Each stage's fingerprint and dvc.yaml deps name its own module, not the others'
(``flows.stages.stage_code``); its MLflow records are in ``flows/stage_logs.py``."""
