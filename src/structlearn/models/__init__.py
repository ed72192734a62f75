"""Models. Each takes ``input_shape`` and ``num_classes`` at run time from the dataset."""

from structlearn.models.mlp import MLP
from structlearn.models.resnet import ResNet
from structlearn.models.vit import ViT
from structlearn.models.wideresnet import WideResNet

__all__ = ["MLP", "ResNet", "ViT", "WideResNet"]
