"""Built-in ops; importing this package registers them."""
from .base import Arg, OpDef, get_op, register_op, registered_ops  # noqa: F401
from . import (attention, conv, elementwise, linear, norm, pooling, residual, shape,  # noqa: F401
               structural, tokens)
