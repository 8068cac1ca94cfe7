"""The engine: what every generation uses through the seam (minirwkv/generation.py), never a generation's modules.

    train.py        the training loop: data, AdamW, evaluation, atomic checkpoints, exact resume (docs/training.md)
    optim.py        AdamW with the official multipliers, the learning-rate schedules, gradient clipping
    data.py         corpora, memory-mapped token files, batches as a function of (seed, step)
    distributed.py  data parallelism over MPI (docs/distributed.md)
    infer.py        RNN-mode runners: RNNRunner (prepared weights, buffers) and ReferenceRunner (docs/inference.md)
    sampling.py     temperature, top-k, top-p, penalties
    generate.py     prompts in, streamed text out; the `minirwkv sample` command
    process.py      process-wide settings the command applies (threads, memory)
"""
