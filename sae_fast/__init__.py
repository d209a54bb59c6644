"""sae_fast: fast sparse autoencoders (JumpReLU) for PyTorch.

    import sae_fast
    sae = sae_fast.JumpReLUSAE.from_pretrained("path/to/params.npz")
    acts = sae.encode_sparse(x)          # SparseActs, never the dense [tokens, d_sae]
    x_hat = sae.decode(acts)
    sae_fast.info()                      # versions, devices, backends
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

try:
    __version__ = _dist_version("sae_fast")  # pyproject.toml holds the one version
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

from . import backends, reference  # noqa: E402
from ._ext import load_extension as _load_extension  # noqa: E402
from ._ext import load_triton as _load_triton
from ._info import info  # noqa: E402
from .modules import JumpReLUSAE, JumpReLUTranscoder  # noqa: E402
from .ops import (  # noqa: E402
    check_pending, jumprelu_encode, jumprelu_encode_sparse, jumprelu_sae_loss, jumprelu_sae_row_grads, sparse_decode,
)
from .optim import SparseAdamB1Zero  # noqa: E402
from .outputs import TrainingOutput  # noqa: E402
from .sparse import SparseActs  # noqa: E402
from .step import RowGrads  # noqa: E402
from .steer import steering  # noqa: E402

_load_extension()
_load_triton()

__all__ = [
    "JumpReLUSAE", "JumpReLUTranscoder", "RowGrads", "SparseActs", "SparseAdamB1Zero", "TrainingOutput", "backends",
    "check_pending", "info", "jumprelu_encode", "jumprelu_encode_sparse", "jumprelu_sae_loss", "jumprelu_sae_row_grads",
    "reference", "sparse_decode", "steering"
]
