"""The trainer's parts; `python -m beni_model.train` launches it (see beni_model/train.py).

config: a stage's settings (TrainConfig). model: the model a stage trains. optim: AdamW groups per part and the
schedule. parallel: torchrun set-up, FSDP2, compile, CUDA graphs. step: one optimizer step. checkpoint: resumable
checkpoints and the final model. metrics: FLOPs, metrics.jsonl, loss.png, the profiler, wandb, Dagster Pipes.
loop: one stage from set-up to summary.
"""
