"""Model: the networks (`models`, using `kernels`) and the pure functions of training and serving
(`steps`: train state, optimizer, train step, eval step, eval logits). No loop, no checkpoint I/O,
no serving: both the training loop and serving build on this."""
