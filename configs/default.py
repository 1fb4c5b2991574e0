r"""The classic Fashion-MNIST CNN with Adam: the reference recipe.

Conv(32, 3x3, VALID)+ReLU -> MaxPool 2 -> Conv(64, 3x3, VALID)+ReLU -> MaxPool 2
-> Flatten -> Dense 128+ReLU -> Dense 10 -> softmax; Adam lr 1e-3, batch 32,
5 epochs, pixels scaled to [0, 1].

Run (offline, from the repository root):

  python -m fashion_jax.main --config=configs/default.py --workdir=/tmp/fj \
      --config.idx_dir=../shared/data/fashion_mnist

Measured on 2 CPU cores (BENCHMARKS.md), with the second conv as Winograd
F(5x5, 3x3) in the native two-layer op (AMD EPYC Zen 3 VM, AVX2 kernels): seeds
0-3 91.71 / 92.15 / 90.87 / 91.47% test accuracy after its 5 epochs (9,375
steps), mean 91.55%, 21.2-26.8 s wall from process start, ~21,800 images/s in
the loop at batch 32. Before F(5x5, 3x3), on a Zen 5 VM (AVX-512 kernels):
seeds 0-3 91.69 / 92.05 / 90.97 / 91.55%, mean 91.57% (91.54% with the kernels
before the two layers became one op, whose gradients summed in another order),
15.5-16 s, ~34,000 images/s. On the AVX2 VM with the earliest kernels: 91.84% in
49 s at ~7,500 images/s (91.92% in 66 s with the XLA Winograd path, 91.70% in
88 s before it).
With 8 devices (JAX_NUM_CPU_DEVICES=8): 91.76% under pmap, 91.55% under mesh.
The same model in Keras reaches 90.8%.
"""

from fashion_jax.default_config import get_config  # Every key, its default and meaning.

__all__ = ["get_config"]
