"""Methods: small objects behind one protocol (:class:`~structlearn.methods.base.Method`)."""

from structlearn.methods.base import Dense, Method, OptimizerSlot, ParamCount, Plan
from structlearn.methods.masked import GMP, MaskedMethod, Static

__all__ = ["GMP", "Dense", "MaskedMethod", "Method", "OptimizerSlot", "ParamCount", "Plan", "Static"]
