"""Datasets: in-memory splits on the training device (toy generators, digits, CIFAR-10)."""

from structlearn.data.base import InMemoryDataset
from structlearn.data.cifar import CIFAR10
from structlearn.data.toy import blobs, classification, digits, moons, spheres

__all__ = ["CIFAR10", "InMemoryDataset", "blobs", "classification", "digits", "moons", "spheres"]
