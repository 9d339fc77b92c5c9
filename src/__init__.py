"""Keras's chapter-2 MNIST classifier as a PyTorch Lightning + Hydra program."""
