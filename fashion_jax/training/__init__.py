"""Training: the loop (`train.train_and_evaluate` and its periodic actions), windows of steps and
where their data comes from (`loop`), stops every process agrees on (`stops`), progress bars
(`progress`). Uses model, data and support; nothing but the entry points imports it."""
