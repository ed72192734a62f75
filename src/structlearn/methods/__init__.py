"""Methods: small objects behind one protocol (:class:`~structlearn.methods.base.Method`)."""

from structlearn.methods.base import Dense, Method, OptimizerSlot, ParamCount, Plan
from structlearn.methods.dst import SET, SNFS, DynamicSparse, RigL
from structlearn.methods.masked import GMP, MaskedMethod, Prunable, Static
from structlearn.methods.morphonet import MorphoNet
from structlearn.methods.prune_init import SNIP, GraSP, PruneAtInit, SynFlow

__all__ = [
    "GMP",
    "SET",
    "SNFS",
    "SNIP",
    "Dense",
    "DynamicSparse",
    "GraSP",
    "MaskedMethod",
    "Method",
    "MorphoNet",
    "OptimizerSlot",
    "ParamCount",
    "Plan",
    "Prunable",
    "PruneAtInit",
    "RigL",
    "Static",
    "SynFlow",
]
