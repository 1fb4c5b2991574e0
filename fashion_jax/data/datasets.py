"""What the code knows about each data set, in one place (no JAX, no I/O).

Every supported data set is 28x28 grayscale with 10 classes; sources, splits and
augmentation live in input_pipeline.py, downloads in download.py.
"""

from __future__ import annotations

IMAGE_SHAPE = (28, 28, 1)  # Height, width, channels of one image (uint8).
NUM_CLASSES = 10

# Label names in label order (as in each data set's README and tfds).
CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(i) for i in range(10)),
}


def class_names(dataset: str) -> tuple[str, ...]:
  """The label names of `dataset` (Fashion-MNIST's for a name it does not know)."""
  return CLASS_NAMES.get(dataset, CLASS_NAMES["fashion_mnist"])
