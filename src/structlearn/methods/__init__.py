"""Methods: small objects behind one protocol (:class:`~structlearn.methods.base.Method`)."""

from structlearn.methods.base import Dense, Method, OptimizerSlot, ParamCount, Plan
from structlearn.methods.dst import SET, DynamicSparse, RigL
from structlearn.methods.masked import GMP, MaskedMethod, Static
from structlearn.methods.morphonet import MorphoNet

__all__ = [
    "GMP",
    "SET",
    "Dense",
    "DynamicSparse",
    "MaskedMethod",
    "Method",
    "MorphoNet",
    "OptimizerSlot",
    "ParamCount",
    "Plan",
    "RigL",
    "Static",
]
