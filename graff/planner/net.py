"""GRAFF's planner network: a graph-recurrent encoder and a linear LR decoder.

Nodes are parameter blocks (one per LoRA-adapted module by default). At step :math:`t` every node
:math:`i` has a feature vector :math:`x_{t,i}` (budget left, LR, loss trend, curvature and
hypergradient statistics of its block, entropy of early-layer tokens; see
:data:`FEATURE_NAMES`) and a latent state :math:`h_{t,i}`. One round of message passing and a GRU
update (weights shared by all nodes, so the planner does not depend on their number):

.. math::

    z_{t,i} = \\tanh(E x_{t,i}),\\quad
    \\mu_{t,i} = \\frac{1}{|\\mathcal N(i)|}\\sum_{j \\in \\mathcal N(i)}
        \\mathrm{ReLU}\\bigl(M [z_{t,j}; h_{t-1,j}]\\bigr),\\quad
    h_{t,i} = \\mathrm{GRU}\\bigl([z_{t,i}; \\mu_{t,i}],\\ h_{t-1,i}\\bigr).

The decoder is linear in the latent state, as the seed requires for the projection guard:

.. math::

    r_t = w \\cdot \\bar h_t + b,\\qquad \\bar h_t = \\tfrac1N \\textstyle\\sum_i h_{t,i},\\qquad
    \\ell_{t,i} = v \\cdot h_{t,i} + a,

:math:`r_t` is the global log-LR residual and :math:`\\ell_{t,i}` the logit of block
:math:`i`'s multiplier :math:`m_{t,i} = \\exp(\\rho \\tanh \\ell_{t,i})`. Without edges
(``edges=False``, the seed's "remove graph edges → MLP" ablation) :math:`\\mu = 0`.

The latent state is a *buffer* owned by the scheduler, not a parameter: a planner trained on one
model loads into a scheduler for another model with a different number of blocks.

Planner files (:func:`save_planner`, :func:`load_planner`) hold only the weights — never
``h``, whose size depends on the number of blocks — as `safetensors
<https://huggingface.co/docs/safetensors>`_: loading one can never execute code, and anything
that is not a graff planner is a clear :class:`~graff.errors.CheckpointError`.

References:
    Li et al., "Gated Graph Sequence Neural Networks", ICLR 2016, https://arxiv.org/abs/1511.05493
    (message passing with GRU updates).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from graff.errors import CheckpointError

FEATURE_NAMES: tuple[str, ...] = (
    "budget_remaining",
    "log_lr_factor",
    "loss_trend",
    "hypergrad_cosine",
    "secant_ratio",
    "relative_update_size",
    "entropy",
    "entropy_trend",
    "stability_usage",
    "calibrating",
)


class PlannerNet(nn.Module):
    """Graph-recurrent encoder plus linear decoder (see module docstring for the equations).

    Args:
        num_features: Length of each node's feature vector.
        hidden: Size of the latent state :math:`h`.
        message: Size of the messages :math:`\\mu`.
        edges: Use message passing between neighbouring blocks (``False``: per-node MLP + GRU).
    """

    def __init__(
        self,
        num_features: int = len(FEATURE_NAMES),
        hidden: int = 16,
        message: int = 16,
        *,
        edges: bool = True,
    ) -> None:
        super().__init__()
        self.num_features, self.hidden, self.message_size = num_features, hidden, message
        self.edges = edges
        self.encode = nn.Linear(num_features, hidden)
        self.message = nn.Linear(2 * hidden, message)
        self.gru = nn.GRUCell(hidden + message, hidden)
        self.lr_w = nn.Parameter(torch.zeros(hidden))
        self.lr_b = nn.Parameter(torch.zeros(()))
        self.mult_w = nn.Parameter(torch.zeros(hidden))
        self.mult_b = nn.Parameter(torch.zeros(()))

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the graph encoder (everything but the decoder)."""
        return [*self.encode.parameters(), *self.message.parameters(), *self.gru.parameters()]

    def initial_state(self, num_nodes: int) -> Tensor:
        """The latent state before the first step: zeros of shape ``(num_nodes, hidden)``."""
        return torch.zeros(num_nodes, self.hidden)

    def forward(self, x: Tensor, h: Tensor, adjacency: Tensor) -> Tensor:
        """One encoder step: features ``(N, F)``, state ``(N, H)``, adjacency ``(N, N)`` -> state.

        ``adjacency`` is the row-normalised matrix from :func:`mean_adjacency` (row ``i`` averages
        over the neighbours of node ``i``); a dense product is faster than scatter ops for the
        few hundred blocks of a model.
        """
        z = torch.tanh(self.encode(x))
        if self.edges and adjacency.numel():
            mu = adjacency @ torch.relu(self.message(torch.cat([z, h], dim=-1)))
        else:
            mu = torch.zeros(x.shape[0], self.message_size, dtype=x.dtype)
        return self.gru(torch.cat([z, mu], dim=-1), h)

    def decode(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Linear decoder: ``(global log-LR residual r (scalar), multiplier logits (N,))``."""
        return self.decode_residual(h), h @ self.mult_w + self.mult_b

    def decode_residual(self, h: Tensor) -> Tensor:
        """The global log-LR residual alone, ``r = w · mean_i(h_i) + b`` (a scalar)."""
        return self.lr_w @ h.mean(dim=0) + self.lr_b


def mean_adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Row-normalised dense adjacency ``A[i, j] = 1/|N(i)|`` for each edge ``j -> i``."""
    adj = torch.zeros(num_nodes, num_nodes)
    if edge_index.numel():
        adj[edge_index[1], edge_index[0]] = 1.0
    return adj / adj.sum(dim=1, keepdim=True).clamp_min(1.0)


# ----------------------------------------------------------------------------- planner files
PLANNER_FORMAT = "graff-planner"
PLANNER_FORMAT_VERSION = "1"
DEFAULT_PLANNER = "default"


def _metadata(planner: PlannerNet) -> dict[str, str]:
    return {
        "format": PLANNER_FORMAT,
        "format_version": PLANNER_FORMAT_VERSION,
        "features": ",".join(FEATURE_NAMES),
        "num_features": str(planner.num_features),
        "hidden": str(planner.hidden),
        "message": str(planner.message_size),
    }


def save_planner(planner: PlannerNet, path: str | Path) -> Path:
    """Write ``planner``'s weights and a format header to ``path`` (safetensors). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in planner.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=_metadata(planner))
    tmp.replace(path)  # atomic: a crash leaves the old file or the new one, never half of one
    return path


def default_planner_path() -> Path:
    """Path of the planner shipped inside the package (``warm_start="default"``)."""
    return Path(str(resources.files("graff.planner") / "default.safetensors"))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a graff planner file (safetensors): {err}") from err


def load_planner(path: str | Path) -> PlannerNet:
    """Load a planner saved by :func:`save_planner` (or ``"default"``, the shipped one).

    Raises:
        CheckpointError: if the file is missing, corrupt, not a planner, of another format
            version, or made for other input features.
    """
    source = default_planner_path() if str(path) == DEFAULT_PLANNER else Path(path)
    if not source.is_file():
        raise CheckpointError(f"planner file {source} does not exist.")
    tensors, meta = _read(source)
    if meta.get("format") != PLANNER_FORMAT:
        raise CheckpointError(f"{source} is not a graff planner (format={meta.get('format')!r}).")
    if meta.get("format_version") != PLANNER_FORMAT_VERSION:
        raise CheckpointError(
            f"{source} is planner format version {meta.get('format_version')!r}; this graff reads "
            f"version {PLANNER_FORMAT_VERSION}."
        )
    if meta.get("features") != ",".join(FEATURE_NAMES):
        raise CheckpointError(
            f"{source} was trained on other input features: {meta.get('features')!r}."
        )
    try:
        features, hidden, message = (int(meta[k]) for k in ("num_features", "hidden", "message"))
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source} has an invalid planner header: {err}") from err
    # Check the sizes against the stored tensors before building anything: a forged header
    # (hidden=10**9) must not make graff allocate a huge network.
    expected = {
        "lr_w": (hidden,),
        "encode.weight": (hidden, features),
        "message.weight": (message, 2 * hidden),
    }
    for key, shape in expected.items():
        t = tensors.get(key)
        if t is None or tuple(t.shape) != shape or not t.is_floating_point():
            raise CheckpointError(
                f"{source} holds planner weights that do not fit its header: {key} should be a "
                f"float tensor of shape {shape}, got {None if t is None else (t.dtype, tuple(t.shape))}."
            )
    if not all(t.is_floating_point() for t in tensors.values()):
        raise CheckpointError(f"{source} holds planner weights that are not floating point.")
    try:
        planner = PlannerNet(features, hidden, message)
        planner.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source} holds planner weights that do not fit: {err}") from err
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise CheckpointError(f"{source} holds non-finite planner weights.")
    return planner
