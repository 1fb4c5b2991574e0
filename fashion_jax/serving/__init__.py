"""Serving: loading a trained run (`inference`), preparing users' photos (`preprocess`), and the
predict, evaluate (+ `report`) and export commands' code. Uses model, data and support (steps and
checkpoints), never the training loop."""
