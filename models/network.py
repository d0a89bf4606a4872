"""The invariant shallow network as a Pyro program (``PyroModule``).

Generative model (van der Ouderaa & van der Wilk, 2022, Eqs. 1-6)::

    W1, b1, W2, b2 ~ N(0, alpha^2)                 prior sample sites (W1, b1 only for ReLU)
    eps            ~ U[-1, 1]^(S x K)              sample site "eps", K = 6 generators
    eta            > 0                              pyro.param "eta" (empirical Bayes); eta_rotate <= pi
    T_s            = expm(sum_k eps_sk eta_k G_k)   s = 1..S
    f_s(x)         = W2 phi((W1 o T_s) x + b1) + b2
    y | x          ~ Categorical(mean_s softmax f_s(x))      (averaging="probs")
                   or Categorical(softmax(mean_s f_s(x)))    (averaging="logits")

Shapes: x ``(B, C, H, W)``, y ``(B,)``, W1 ``(D, C*H*W)``, W2 ``(num_classes, D)``,
eps ``(S, K)``. Under vectorised particles or ``Predictive(parallel=True)`` every sample site
gains leading dimensions ``(P, 1)``, where the trailing 1 is the slot of the ``data`` plate;
the forward pass flattens them to one dimension P and restores them at the end.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroParam, PyroSample
from torch.distributions import constraints

from models.config import FirstLayer, ModelConfig, TransformMode, WarpImpl
from models.kernels import batched_linear, warped_linear
from models.likelihoods import likelihood_of
from models.priors import ETA_MAX, EtaPrior, PriorKind, eta_prior, layer_of, tau_prior, weight_prior
from models.transforms import (
    GENERATOR_NAMES,
    affine_generators,
    affine_matrices,
    warp_filters,
    warp_images,
)


def _site_prior(name: str, shape: tuple[int, ...], fan_in: int):
    """The prior of weight site ``name`` as a ``PyroSample`` callable (reads the layer scale if any)."""

    def prior(self: InvariantNet) -> dist.Distribution:
        kind = self.config.prior
        tau = getattr(self, f"tau_{layer_of(name)}") if kind is PriorKind.HIERARCHICAL else None
        return weight_prior(kind, shape, fan_in, self.prior_loc, self.prior_scale, tau)

    return prior


def rff_weights(num_features: int, image_shape: tuple[int, int, int], scale: float, blur: float = 0.0) -> torch.Tensor:
    """Random Fourier feature frequencies ``(D, C*H*W)``: rows ~ N(0, scale^2 / (C*H*W) I).

    With ``blur > 0`` each row, seen as an image, is convolved with a normalised Gaussian of std
    ``blur`` pixels (zero padding): ``W1 x = omega . (G x)``, the features of the same RBF kernel
    (lengthscale ``sqrt(C*H*W) / scale``) on blurred images. White-noise filters change at the pixel
    scale, so their warps (and the gradient with respect to eta) are dominated by interpolation
    noise; smooth ones are not.
    """
    C, H, W = image_shape
    P = C * H * W
    w = torch.randn(num_features, P)
    if blur > 0:
        radius = max(1, math.ceil(3 * blur))
        t = torch.arange(-radius, radius + 1, dtype=w.dtype)
        g = torch.exp(-0.5 * (t / blur) ** 2)
        g = g / g.sum()
        img = w.reshape(num_features * C, 1, H, W)
        img = torch.nn.functional.conv2d(img, g.view(1, 1, 1, -1), padding=(0, radius))
        img = torch.nn.functional.conv2d(img, g.view(1, 1, -1, 1), padding=(radius, 0))
        w = img.reshape(num_features, P)
    return w * scale / math.sqrt(P)


class InvariantNet(PyroModule):
    """Shallow Bayesian network made invariant by averaging over transformed first-layer weights.

    Parameters
    ----------
    config : ModelConfig
        Architecture, prior and invariance settings.
    num_data : int
        Size N of the training set; the likelihood of a minibatch of B examples is scaled by N / B
        through ``pyro.plate("data", N, subsample=...)``.

    Notes
    -----
    Sample sites: ``W1``, ``b1`` (ReLU only; the RFF first layer is a fixed random buffer),
    ``W2``, ``b2``, ``eps`` and the observed ``obs``. Param site: ``eta`` (positive), unless
    ``config.learn_eta`` is False, in which case eta is a buffer. Generators outside
    ``config.generators`` are masked to eta = 0.

    Examples
    --------
    >>> model = InvariantNet(ModelConfig(hidden=16, num_transforms=4), num_data=100)
    >>> log_p = model(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    >>> log_p.shape
    torch.Size([8, 10])
    """

    def __init__(self, config: ModelConfig, num_data: int) -> None:
        super().__init__()
        if int(num_data) < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data}")
        self.config = config
        self.likelihood = likelihood_of(config)  # p(y | f_1..f_S): combines the S transformed copies
        self.num_data = int(num_data)
        self._eta_frozen = False
        self._w1_prior_masked = False
        D, P = config.hidden, config.num_pixels
        self.generator_names = config.generator_names  # the basis, K = 6 names in the order of eta and eps
        self.register_buffer("generators", affine_generators(self.generator_names))  # (K, 3, 3)
        mask = torch.tensor([name in config.generators for name in self.generator_names], dtype=torch.float)
        self.register_buffer("generator_mask", mask)  # (K,)
        is_shift = [name.startswith("translate") for name in self.generator_names]
        self.register_buffer("translation_mask", torch.tensor(is_shift, dtype=torch.float), persistent=False)
        upper = [math.pi if name == "rotate" else math.inf for name in self.generator_names]
        self.register_buffer("eta_upper", torch.tensor(upper), persistent=False)  # (K,): U[-pi, pi] is a full turn
        self.register_buffer("prior_loc", torch.tensor(0.0))
        self.register_buffer("prior_scale", torch.tensor(float(config.prior_scale)))
        eta0 = torch.full((len(GENERATOR_NAMES),), float(config.eta_init))
        if config.eta_prior is not EtaPrior.NONE:
            self.register_buffer("eta", torch.full_like(eta0, float("nan")))  # eta is a sample site instead
        elif config.learn_eta:
            self.eta = PyroParam(eta0, constraint=constraints.positive)
        else:
            self.register_buffer("eta", eta0)
        if config.first_layer is FirstLayer.RFF:  # fixed W1 ~ N(0, s^2 / P), b1 ~ U[0, 2 pi)
            self.register_buffer("W1", rff_weights(D, config.image_shape, config.rff_scale, config.rff_blur))
            self.register_buffer("b1", torch.rand(D) * 2 * math.pi)
        if config.prior is PriorKind.HIERARCHICAL:
            for layer in sorted({layer_of(name) for name in self.weight_shapes()}):
                setattr(self, f"tau_{layer}", PyroSample(lambda self: tau_prior(self.prior_scale)))
        fan_in = {"1": P, "2": D}
        for name, shape in self.weight_shapes().items():
            setattr(self, name, PyroSample(_site_prior(name, shape, fan_in[layer_of(name)])))

    # ------------------------------------------------------------------ pieces
    @property
    def eta_effective(self) -> torch.Tensor:
        """eta with inactive generators masked to zero, eta_rotate at most pi and, with ``max_shift``, bounded
        translations; shape ``(K,)`` (detached inside :meth:`eta_frozen`)."""
        eta = self.eta * self.generator_mask
        # a rotation extent past pi is a full turn: min(eta, pi), with eta's gradient (project_eta_ keeps eta <= pi)
        eta = torch.minimum(eta, self.eta_upper).detach() + (eta - eta.detach())
        if self.config.max_shift is not None:  # translations saturate smoothly at max_shift: b tanh(eta / b)
            b = self.config.max_shift
            eta = torch.where(self.translation_mask.bool(), b * torch.tanh(eta / b), eta)
        return eta.detach() if self._eta_frozen else eta

    @torch.no_grad()
    def project_eta_(self) -> None:
        """Project a learned eta back onto its feasible set, eta_rotate <= pi (projected gradient ascent).

        U[-eta, eta] with eta >= pi covers every angle, so :attr:`eta_effective` uses min(eta, pi), the full
        turn; past pi the bound is flat, and without this projection eta's unconstrained value would
        random-walk on gradient noise until the numbers break. Called after every
        optimiser step (:func:`inference.optim.svi_step`); a no-op below pi and for fixed or latent eta.
        """
        if self.config.learn_eta and self.config.eta_prior is EtaPrior.NONE:
            u = self.eta_unconstrained  # eta = exp(u) (constraints.positive)
            u.copy_(torch.minimum(u, torch.log(self.eta_upper).to(u)))

    @contextlib.contextmanager
    def eta_frozen(self) -> Iterator[None]:
        """Within this block the model uses eta's value but passes it no gradient.

        The held-out objective (:mod:`inference.heldout`) fits the weights and the guide with eta held
        fixed and moves eta by another term.
        """
        before, self._eta_frozen = self._eta_frozen, True
        try:
            yield
        finally:
            self._eta_frozen = before

    @contextlib.contextmanager
    def first_layer_prior_masked(self) -> Iterator[None]:
        """Within this block log p(W1, b1) is left out of the joint density (as with ``first_layer_prior=False``).

        The sequential ``evidence`` schedule fits the predicting guide this way: its point-estimated W1 is
        then a hyperparameter (ML-II, the paper's ReLU network) while the evidence guide, outside the
        block, keeps the prior over every weight.
        """
        before, self._w1_prior_masked = self._w1_prior_masked, True
        try:
            yield
        finally:
            self._w1_prior_masked = before

    @property
    def has_transforms(self) -> bool:
        """False when no generator is active: then the S samples coincide and are skipped."""
        return bool(self.config.generators)

    def eps_prior(self, num_transforms: int) -> dist.Distribution:
        """p(eps) = U[-1, 1]^(S x K), event shape ``(S, K)``."""
        like = self.prior_loc
        low = -torch.ones(num_transforms, len(GENERATOR_NAMES), device=like.device, dtype=like.dtype)
        return dist.Uniform(low, -low).to_event(2)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Event shapes of the weight sample sites, in the order the model samples them."""
        D, P, C = self.config.hidden, self.config.num_pixels, self.config.num_classes
        shapes: dict[str, tuple[int, ...]] = {}
        if self.config.first_layer is FirstLayer.RELU:
            shapes.update({"W1": (D, P), "b1": (D,)})
        shapes.update({"W2": (C, D), "b2": (C,)})
        return shapes

    def weight_priors(self) -> dict[str, dist.Distribution]:
        """p(theta) per weight site with the site's event shape (hierarchical: at tau = alpha)."""
        cfg, P, D = self.config, self.config.num_pixels, self.config.hidden
        return {
            name: weight_prior(cfg.prior, shape, P if layer_of(name) == "1" else D, self.prior_loc,
                               self.prior_scale, self.prior_scale if cfg.prior is PriorKind.HIERARCHICAL else None)
            for name, shape in self.weight_shapes().items()
        }

    def initial_values(self) -> dict[str, torch.Tensor]:
        """Initial values of every latent site but eps, for guide init.

        Xavier-uniform weights and zero biases (the paper's initialisation); layer scales tau at
        alpha; eta (full Bayes) at ``eta_init``.
        """
        dev, dtype = self.prior_loc.device, self.prior_loc.dtype
        values: dict[str, torch.Tensor] = {}
        if self.config.prior is PriorKind.HIERARCHICAL:
            values.update({f"tau_{layer_of(n)}": self.prior_scale.clone() for n in self.weight_shapes()})
        for name, shape in self.weight_shapes().items():
            if len(shape) == 2:
                bound = math.sqrt(6.0 / (shape[0] + shape[1]))
                values[name] = (torch.rand(shape, device=dev, dtype=dtype) * 2 - 1) * bound
            else:
                values[name] = torch.zeros(shape, device=dev, dtype=dtype)
        if self.config.eta_prior is not EtaPrior.NONE:
            values["eta"] = self.initial_eta()
        return values

    def initial_eta(self) -> torch.Tensor:
        """Initial value of a full-Bayes eta, ``(K,)``: ``eta_init`` kept inside the prior's support (no randomness)."""
        like = self.prior_loc
        return torch.full((len(GENERATOR_NAMES),), min(self.config.eta_init, 0.99 * ETA_MAX), device=like.device,
                          dtype=like.dtype)

    def latent_sites(self) -> dict[str, dict]:
        """Every latent site but eps, in the order the model samples them.

        Returns
        -------
        dict
            ``name -> {"fn": prior distribution, "support": constraint, "event_dim": int}``, read
            off one prototype run of the model on a blank image (as autoguides do).
        """
        x = torch.zeros(1, *self.config.image_shape, device=self.prior_loc.device, dtype=self.prior_loc.dtype)
        with torch.no_grad():
            trace = poutine.trace(poutine.block(self, hide=["eps"])).get_trace(x)
        return {
            name: {"fn": site["fn"], "support": site["fn"].support, "event_dim": site["fn"].event_dim}
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site["infer"].get("_do_not_trace")
            and name not in ("obs", "data")
        }

    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        C, H, W = self.config.image_shape
        if x.dim() != 4 or tuple(x.shape[1:]) != (C, H, W):
            raise ValueError(f"expected images of shape (B, {C}, {H}, {W}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"expected at least one image, got an empty batch of shape {tuple(x.shape)}")
        if x.dtype != self.prior_loc.dtype:
            raise ValueError(f"expected images of dtype {self.prior_loc.dtype} (the model's), got {x.dtype}")
        expected = self.likelihood.label_shape(x.shape[0])
        if y is not None and y.shape != expected:
            raise ValueError(f"expected labels of shape {tuple(expected)}, got {tuple(y.shape)}")

    def transformed_logits(
        self, x: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor,
        eps: torch.Tensor, eta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of every transformed copy of the network, f_s(x).

        Parameters
        ----------
        x : torch.Tensor
            ``(B, C, H, W)``.
        W1, b1, W2, b2 : torch.Tensor
            ``(P, D, C*H*W)``, ``(P, D)``, ``(P, classes, D)``, ``(P, classes)``.
        eps : torch.Tensor
            ``(P, S, K)``.
        eta : torch.Tensor, optional
            Effective eta, ``(K,)`` or ``(P, 1, K)`` (full Bayes); default :attr:`eta_effective`.

        Returns
        -------
        torch.Tensor
            ``(P, S', B, classes)`` with S' = S, or S' = 1 when no generator is active.
        """
        B = x.shape[0]
        x_flat = x.reshape(B, -1)  # (B, CHW)
        eta = self.eta_effective if eta is None else eta
        if not self.has_transforms:
            pre = torch.matmul(x_flat, W1.transpose(-1, -2)).unsqueeze(1)  # (P, 1, B, D)
        elif self.config.transform_mode is TransformMode.IDENTITY:  # S unwarped passes: the benchmark floor
            Pn, S = eps.shape[:2]
            pre = batched_linear(x_flat.expand(Pn, S, B, x_flat.shape[-1]), W1)  # (P, S, B, D): P*S GEMM passes
        elif self.config.transform_mode is TransformMode.WEIGHTS:
            T = affine_matrices(eta, eps, self.generators)  # (P, S, 3, 3)
            if self.config.warp_impl is WarpImpl.GATHER:  # same function: one gather warp + one GEMM
                pre = warped_linear(x, W1, T, self.config.image_shape)  # (P, S, B, D)
            else:
                W1_T = warp_filters(W1, T, self.config.image_shape)  # (P, S, D, CHW)
                pre = torch.matmul(x_flat, W1_T.transpose(-1, -2))  # (P, S, B, D)
        else:  # inputs: W1 (T^-1 x); T^-1 = expm(-A)
            T_inv = affine_matrices(eta, -eps, self.generators)  # (P, S, 3, 3)
            Pn, S = T_inv.shape[:2]
            xs = x.unsqueeze(0).expand(Pn * S, *x.shape).reshape(Pn * S * B, *x.shape[1:])
            Ts = T_inv.reshape(Pn * S, 1, 3, 3).expand(Pn * S, B, 3, 3).reshape(-1, 3, 3)
            x_T = warp_images(xs, Ts).reshape(Pn, S, B, -1)  # (P, S, B, CHW)
            pre = batched_linear(x_T, W1)  # (P, S, B, D), one GEMM when W1 is shared by the P samples
        pre = pre + b1[:, None, None, :]
        if self.config.first_layer is FirstLayer.RELU:
            h = torch.relu(pre)
        else:
            h = math.sqrt(2.0 / self.config.hidden) * torch.cos(pre)
        return torch.matmul(h, W2.transpose(-1, -2).unsqueeze(1)) + b2[:, None, None, :]  # (P, S, B, classes)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """The S copies combined into a prediction by the likelihood (:mod:`models.likelihoods`):
        ``(*lead, S, B, outputs) -> (*lead, B, outputs)``, class log-probabilities for classification."""
        return self.likelihood.combine(logits)[0]

    # ------------------------------------------------------------------ model
    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, num_transforms: int | None = None
    ) -> torch.Tensor:
        """Run the generative model; observe ``y`` when given.

        Parameters
        ----------
        x : torch.Tensor
            Images ``(B, C, H, W)``.
        y : torch.Tensor, optional
            Labels ``(B,)`` in ``[0, num_classes)``.
        num_transforms : int, optional
            S for this call (default ``config.num_transforms``), e.g. 32 at evaluation.

        Returns
        -------
        torch.Tensor
            Log predictive probabilities given the sampled weights, ``(*lead, B, classes)``.
        """
        self._check_inputs(x, y)
        S = self.config.num_transforms if num_transforms is None else int(num_transforms)
        if S < 1:
            raise ValueError(f"num_transforms must be a positive integer, got {S}")
        with poutine.mask(mask=self.config.first_layer_prior and not self._w1_prior_masked):
            W1, b1 = self.W1, self.b1
        with poutine.mask(mask=self.config.output_layer_prior):
            W2, b2 = self.W2, self.b2
        full_bayes = self.config.eta_prior is not EtaPrior.NONE
        if full_bayes:  # eta is a sample site, (*lead, K)
            eta = pyro.sample("eta", eta_prior(len(GENERATOR_NAMES), self.prior_loc)) * self.generator_mask
        else:  # a parameter (or fixed buffer), (K,)
            eta = self.eta_effective
        eps = pyro.sample("eps", self.eps_prior(S))  # (*lead, S, K)
        lead = torch.broadcast_shapes(W1.shape[:-2], b1.shape[:-1], W2.shape[:-2], b2.shape[:-1], eps.shape[:-2],
                                      eta.shape[:-1])

        def flat(t: torch.Tensor, event: int) -> torch.Tensor:
            return t.expand(*lead, *t.shape[t.dim() - event :]).reshape(-1, *t.shape[t.dim() - event :])

        if full_bayes:
            eta = flat(eta, 1).unsqueeze(1)  # (P, 1, K)
        logits = self.transformed_logits(x, flat(W1, 2), flat(b1, 1), flat(W2, 2), flat(b2, 1), flat(eps, 2), eta)
        # drop the data plate's size-1 slot when the leading dims carry one: (P, 1) -> (P,)
        out_lead = lead[:-1] if lead and lead[-1] == 1 else lead
        logits = logits.reshape(*out_lead, *logits.shape[1:])  # (*lead, S', B, classes)
        out, obs_dist = self.likelihood.combine(logits)  # (*lead, B, outputs) and p(y | x)
        B = x.shape[0]
        with pyro.plate("data", self.num_data, subsample=torch.arange(B, device=x.device)):
            pyro.sample("obs", obs_dist, obs=y)
        return out
