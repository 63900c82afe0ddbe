"""The networks: torchvision DenseNets (:mod:`model.nets.densenet`), the pruned DenseNet that
compression produces (:mod:`model.nets.pruned`) and the table of architectures a bundle can name
(:mod:`model.nets.archs`).

``from model.nets import build_model, pooled_features`` is the public way in; modules inside this
package import each other by their full module path, never through this file.
"""

from model.nets.archs import *  # noqa: F403 - each module's __all__ is this package's API
from model.nets.archs import __all__ as _archs_all
from model.nets.densenet import *  # noqa: F403
from model.nets.densenet import __all__ as _densenet_all
from model.nets.pruned import *  # noqa: F403
from model.nets.pruned import __all__ as _pruned_all

__all__ = [*_archs_all, *_densenet_all, *_pruned_all]
