"""Run training jobs under mpiexec for tests/test_distributed.py; each rank saves what it ended with.

    mpiexec -n 2 python tests/mpi_scripts/train_ranks.py JOBS.json

JOBS.json is a list of {"config": TrainConfig fields, "save": path prefix, "interrupt_at": step or null}. Every
rank writes PREFIX.rank<r>.npz: its final parameters, the step and val loss it returned, and how many checkpoint
files it wrote.
"""
import json
import sys

import numpy as np

from minirwkv import train as train_module
from minirwkv.config import TrainConfig
from minirwkv.engine.train import train

saves = []
real_save_checkpoint = train_module.save_checkpoint


def counting_save_checkpoint(path, *args, **kwargs):
    saves.append(str(path))
    return real_save_checkpoint(path, *args, **kwargs)


train_module.save_checkpoint = counting_save_checkpoint


def main(path):
    for job in json.load(open(path)):
        stop = job.get("interrupt_at")

        def on_step(step, loss):
            if step == stop:  # Ctrl-C as mpiexec delivers it: to every rank, here after the same step
                raise KeyboardInterrupt

        saves.clear()
        result = train(TrainConfig(**job["config"]), on_step=on_step if stop else None, echo=lambda *a: None)
        val_loss = np.nan if result.val_loss is None else result.val_loss
        np.savez(f"{job['save']}.rank{result.rank}.npz", step=result.step, world_size=result.world_size,
                 interrupted=result.interrupted, saves=len(saves), val_loss=val_loss,
                 **{f"param/{k}": a for k, a in result.params.items()})


if __name__ == "__main__":
    main(sys.argv[1])
