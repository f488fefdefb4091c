"""The distillation trainer's parts: config, schedule, data order, checkpoints, run log, loop."""
