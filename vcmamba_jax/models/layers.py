"""PyTorch-faithful building blocks (NHWC) shared by the VCMamba family.

Defaults that differ between PyTorch and Flax are written once here: BatchNorm eps 1e-5 and momentum
0.1 (PyTorch convention) with PyTorch's unbiased running variance, LayerNorm eps 1e-5, exact (erf)
GELU, and symmetric explicit padding for every convolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vcmamba_jax.models import ops
from vcmamba_jax.models.options import RematMlp

Dtype = Any
Initializer = Callable[..., jax.Array]

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch
LN_EPS = 1e-5
LINEAR_INIT_STD = 0.02  # timm trunc_normal_(std=.02) on every Linear / 1x1 Mlp conv


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as torch.nn.GELU() (same formula as torch: x/2 * (1 + erf(x/sqrt(2))))."""
  return ops.gelu(x)


def torch_default_init(fan_in: int) -> Initializer:
  """PyTorch's default Conv/Linear init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


normal_init = nn.initializers.normal(LINEAR_INIT_STD)
# timm lecun_normal_: fan-in variance scaling with a truncated normal (std sqrt(1/fan_in)).
lecun_normal_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, matching torch.nn.BatchNorm2d / SyncBatchNorm.

  Train mode normalises with the batch mean and BIASED batch variance (float32 statistics) and
  updates the running statistics with the UNBIASED variance, like PyTorch. Under ``jax.jit`` with
  a batch sharded over devices, the statistics are those of the global batch (SyncBatchNorm).
  ``activation`` ('none' | 'relu' | 'gelu') is applied to the output; in train mode it is fused
  into BatchNorm's hand-written backward pass (``ops.batch_norm_train``), which keeps only the
  input for the backward pass instead of float32 copies of normalised and activated tensors.
  In train mode, ``moments`` (x's batch mean and biased variance, from the op that produced x:
  ``DepthwiseConv(..., with_moments=True)``) replace the statistics passes.
  """

  epsilon: float = BN_EPS
  momentum: float = BN_MOMENTUM
  activation: ops.Activation = 'none'
  dtype: Dtype = jnp.float32
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    train: bool,
    moments: tuple[jax.Array, jax.Array] | None = None,
    normalize: bool = True,
  ) -> jax.Array | ops.TrainBatchNorm:
    """``normalize=False`` (train mode): the running statistics are updated as always, but x
    is not normalised; returns what a following op needs to apply this BatchNorm itself
    (``ops.TrainBatchNorm``: e.g. `DepthwiseConv(prologue=...)`)."""
    features = x.shape[-1]
    f32 = jnp.float32
    scale = self.param('scale', self.scale_init, (features,), f32)
    bias = self.param('bias', nn.initializers.zeros, (features,), f32)
    running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), f32))
    running_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), f32))
    if train:
      if normalize:
        y, mean, var = ops.batch_norm_train(x, scale, bias, self.epsilon, self.activation, moments)
      else:
        mean, var = ops.batch_moments(x) if moments is None else moments
        y = ops.TrainBatchNorm(scale, bias, (mean, var), self.epsilon, self.activation)
      if not self.is_initializing():
        count = math.prod(x.shape[:-1])
        unbiased = var * (count / max(count - 1, 1))
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
      return y.astype(self.dtype) if normalize else y
    affine = self._affine(scale, bias, running_mean.value, running_var.value)
    return ops.batch_norm_eval(x, *affine, self.activation, self.dtype)

  def _affine(self, scale, bias, mean, var):
    return mean, scale * jax.lax.rsqrt(var + self.epsilon), bias

  def eval_affine(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean, scale * rsqrt(var + eps), bias): inference's affine map, from the existing
    variables (for a caller that fuses it into the op before, e.g. `DepthwiseConv`)."""
    params, stats = self.variables['params'], self.variables['batch_stats']
    return self._affine(params['scale'], params['bias'], stats['mean'], stats['var'])


def layer_norm(dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over the last axis as PyTorch's: eps 1e-5, two-pass float32 statistics, float32
  scale/bias, output in ``dtype``."""
  return nn.LayerNorm(
    epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, name=name
  )


def conv(
  features: int,
  kernel_size: int,
  *,
  stride: int = 1,
  groups: int = 1,
  in_features: int,
  dtype: Dtype,
  name: str,
  kernel_init: Initializer | None = None,
  bias_init: Initializer | None = None,
) -> nn.Conv:
  """A KxK convolution with PyTorch's symmetric padding K//2 and bias.

  Defaults to PyTorch's init, U(+-1/sqrt(fan_in)) for weight and bias.
  """
  fan_in = (in_features // groups) * kernel_size * kernel_size
  pad = kernel_size // 2
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    feature_group_count=groups,
    use_bias=True,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init or torch_default_init(fan_in),
    bias_init=bias_init or torch_default_init(fan_in),
    name=name,
  )


class DenseBiasAfterMatmul(nn.Module):
  """``nn.Dense`` (the same parameters, init and numbers) whose bias is added after the matmul's
  output exists, so that the add fuses into the output's readers.

  For the Mlp's fc1, whose output BatchNorm reads three times anyway: XLA otherwise folds the bias
  into the cuBLAS call as its C operand, a broadcast [tokens, hidden] tensor written by a kernel of
  its own and read by the GEMM (deviceless for an H100, B at batch 128: 20 such tensors, 2 GB
  written and read a train step; fc1 of stages 1-3, whose outputs are channel-major there).

  ``save_name``: under a remat policy that saves this name, the matmul's output is saved, not
  the output with its bias (which the saved one then gives again, fused into its readers): the
  biased output would be a pass of its own (read and written once more in the forward).
  """

  features: int
  dtype: Dtype
  kernel_init: Initializer = normal_init
  bias_init: Initializer = nn.initializers.zeros
  save_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, split_bias: bool = False):
    """x @ kernel + bias; with ``split_bias``, (x @ kernel, bias) in the compute dtype, for a
    consumer that adds the bias itself (``ops.TrainBatchNorm.input_bias``)."""
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.optimization_barrier(
      jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    )
    if self.save_name is not None:
      y = checkpoint_name(y, self.save_name)
    return (y, bias) if split_bias else y + bias


def dense(
  features: int,
  *,
  dtype: Dtype,
  name: str,
  use_bias: bool = True,
  kernel_init: Initializer = normal_init,
  bias_init: Initializer = nn.initializers.zeros,
  bias_after_matmul: bool = False,
  save_name: str | None = None,
) -> nn.Module:
  """A Linear / 1x1 convolution on the channel axis (kernel [in, out]); `bias_after_matmul`:
  ``DenseBiasAfterMatmul`` (same parameters and numbers; `save_name` its remat tag)."""
  if bias_after_matmul and use_bias:
    return DenseBiasAfterMatmul(
      features,
      dtype=dtype,
      kernel_init=kernel_init,
      bias_init=bias_init,
      save_name=save_name,
      name=name,
    )
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    bias_init=bias_init,
    name=name,
  )


class DepthwiseConv(nn.Module):
  """Depthwise KxK conv with bias, stride 1, padding K//2 (torch Conv2d(C, C, K, groups=C)).

  The parameters are those of ``conv(C, K, groups=C, ...)`` (kernel [K, K, 1, C], bias [C],
  PyTorch's init); the computation is ``ops.depthwise_conv``; impl 'auto' runs the Pallas kernels
  (GPUs; the taps VJP elsewhere) in training and XLA's convolution (cuDNN on GPUs) in inference;
  impl 'pallas' with an ``epilogue`` in inference runs the conv, BatchNorm and GELU as one Pallas
  kernel.
  """

  kernel_size: int
  impl: ops.DepthwiseImpl = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    train: bool = True,
    with_moments: bool = False,
    epilogue: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    prologue: ops.TrainBatchNorm | None = None,
  ):
    """y, or (y, moments) with ``with_moments``: y's batch mean and biased variance where the
    implementation computes them in the conv's pass (impl 'pallas' in training), else None.
    In inference, ``epilogue`` (a following BatchNorm's `eval_affine()`): GELU(BatchNorm(y)),
    in one Pallas kernel with impl 'pallas' (`ops.depthwise_conv_bn_gelu`). In training,
    ``prologue`` (a preceding BatchNorm's `normalize=False` result; x is that BatchNorm's
    input): the conv of GELU(BatchNorm(x)), whose backward kernel also sums BatchNorm's
    gradients with impl 'pallas' (`ops.bn_gelu_depthwise_train`)."""
    channels, k = x.shape[-1], self.kernel_size
    init = torch_default_init(k * k)
    kernel = self.param('kernel', init, (k, k, 1, channels), jnp.float32)
    bias = self.param('bias', init, (channels,), jnp.float32)
    impl = self.impl
    if impl == 'auto':
      # Training: the Pallas kernels on GPUs (`ops.training_depthwise_impl`). Inference: cuDNN's
      # forward (H200, B, bf16: 9,205 img/s against 8,111 for taps). With the BatchNorm + GELU
      # epilogue, 'pallas' fuses the three into one kernel (`depthwise_pallas.depthwise_bn_gelu`):
      # on an H200 (2026-12-07, B, bf16, batch 256) it infers at 10,067 img/s against 10,982 for
      # cuDNN's conv and one BatchNorm + GELU pass, in 1.49 GiB of peak memory against 1.92:
      # opt-in.
      impl = ops.training_depthwise_impl() if train else 'xla'
    x = x.astype(self.dtype)
    if epilogue is not None:
      if train:
        raise ValueError('DepthwiseConv: epilogue is for inference (BatchNorm running statistics)')
      return ops.depthwise_conv_bn_gelu(x, kernel, bias, epilogue, impl=impl)
    if prologue is not None:
      if not train:
        raise ValueError('DepthwiseConv: prologue is for training (BatchNorm batch statistics)')
      y, moments = ops.bn_gelu_depthwise_train(x, prologue, kernel, bias, impl=impl)
      return (y, moments) if with_moments else y
    if with_moments and train:
      return ops.depthwise_conv_with_moments(x, kernel, bias, impl=impl)
    y = ops.depthwise_conv(x, kernel, bias, impl=impl)
    return (y, None) if with_moments else y


def drop_path(
  rate: float | jax.Array, x: jax.Array, train: bool, noise: jax.Array | None = None
) -> jax.Array:
  """Stochastic depth per sample (timm/mmcv): in training, each sample is dropped with prob
  ``rate`` and kept samples are scaled by 1/(1-rate). ``noise`` ([batch] uniform in [0, 1), this
  site's row of a model's `DropPathNoise`): a sample is kept where its noise < 1 - rate. Without
  it the draw is this site's own, from the 'drop_path' RNG stream (call it inside a compact
  ``__call__``: the dropout layer belongs to the caller). ``rate`` may be a traced scalar (the
  blocks of a stage under `nn.scan` each have their own)."""
  if noise is not None:
    if not train or (isinstance(rate, (int, float)) and rate == 0.0):
      return x
    keep = 1.0 - rate if isinstance(rate, (int, float)) else 1.0 - jnp.asarray(rate, jnp.float32)
    mask = (noise < keep).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    scale = keep if isinstance(keep, float) else keep.astype(x.dtype)  # as nn.Dropout rounds it
    return jnp.where(mask, x / scale, jnp.zeros((), x.dtype))
  if isinstance(rate, (int, float)):
    return nn.Dropout(rate, broadcast_dims=tuple(range(1, x.ndim)), rng_collection='drop_path')(
      x, deterministic=not train
    )
  return StochasticDepth()(x, rate, train)


class DropPathNoise(nn.Module):
  """The uniform noise of a model's ``sites`` drop-path sites in one draw from the 'drop_path'
  stream: [sites, batch], row i for site i's `drop_path(..., noise=row)`. Each site drawing
  for itself (a fold-in of the stream and a draw per site, both expanded threefry) compiled B's
  train step for an H100 in 87.6 / 82.6 s (deviceless), one draw in 67.9 s, with the same
  distribution and the same bytes moved."""

  sites: int

  @nn.compact
  def __call__(self, batch: int) -> jax.Array:
    return jax.random.uniform(self.make_rng('drop_path'), (self.sites, batch), jnp.float32)


class StochasticDepth(nn.Module):
  """`drop_path` for a rate that is an array, drawing its own noise: nn.Dropout's draw (the
  bits of `jax.random.bernoulli`) and scaling, which nn.Dropout cannot do with a traced rate."""

  @nn.compact
  def __call__(self, x: jax.Array, rate: jax.Array, train: bool) -> jax.Array:
    if not train:
      return x
    noise = jax.random.uniform(self.make_rng('drop_path'), (x.shape[0],), jnp.float32)
    return drop_path(rate, x, train, noise)


# What the conv Mlp keeps for its backward pass under `FFNBlock(remat_mlp != 'none')`.
MLP_SAVED = 'mlp_saved'


class Mlp(nn.Module):
  """EfficientFormer/VCMamba conv Mlp: 1x1 -> BN -> GELU -> dw3x3 -> BN -> GELU -> 1x1 -> BN.

  ``remat`` ('none' | 'fc2_input' | 'all'; training under `nn.remat` with
  `save_only_these_names(MLP_SAVED)`, see FFNBlock): the BatchNorms take their batch moments
  from outside their VJPs, and the outputs of fc1, the depthwise conv and fc2 and the three
  moments are tagged MLP_SAVED (with 'fc2_input' also the first GELU output, the conv's input):
  the backward pass keeps those and recomputes the other GELU outputs (elementwise) instead of
  keeping them. Same numbers.
  """

  hidden_features: int
  depthwise_impl: ops.DepthwiseImpl = 'auto'
  remat: RematMlp = 'none'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    hidden = self.hidden_features
    remat = self.remat != 'none' and train

    def saved(y, moments=None, tag_y=True):
      """Under remat: y tagged (unless `tag_y` is False: its producer tagged what gives it), and
      y's batch moments (given, or computed here) tagged."""
      if not remat:
        return y, moments
      if moments is None:
        moments = ops.batch_moments(y)
      return checkpoint_name(y, MLP_SAVED) if tag_y else y, checkpoint_name(moments, MLP_SAVED)

    fc1 = dense(
      hidden,
      dtype=self.dtype,
      name='fc1',
      bias_after_matmul=True,
      save_name=MLP_SAVED if remat else None,
    )
    norm1 = BatchNorm(activation='gelu', dtype=self.dtype, name='norm1')
    mid = DepthwiseConv(3, impl=self.depthwise_impl, dtype=self.dtype, name='mid')
    mid_norm = BatchNorm(activation='gelu', dtype=self.dtype, name='mid_norm')
    if train:
      # norm1 + GELU (and fc1's bias before them) applied by the conv, whose backward kernel
      # then also sums norm1's gradients (`ops.bn_gelu_depthwise_train`).
      x, fc1_bias = fc1(x, split_bias=True)
      z = x + fc1_bias  # norm1's input (XLA computes it where it is read)
      _, moments = saved(z, tag_y=False)
      bn = norm1(z, train, moments, normalize=False)
      keep_conv_input = remat and self.remat == 'fc2_input'
      bn = bn._replace(input_bias=fc1_bias, save_name=MLP_SAVED if keep_conv_input else None)
      x, moments = saved(*mid(x, train, with_moments=True, prologue=bn))
      x = mid_norm(x, train, moments)
    elif self.is_initializing():
      x, moments = mid(norm1(fc1(x), train), train, with_moments=True)
      x = mid_norm(x, train, moments)
    else:  # inference: the conv, mid_norm and GELU in one pass where the impl fuses them
      x = mid(norm1(fc1(x), train), train, epilogue=mid_norm.eval_affine())
    x, moments = saved(dense(features, dtype=self.dtype, name='fc2')(x))
    return BatchNorm(dtype=self.dtype, name='norm2')(x, train, moments)


class FFNBlock(nn.Module):
  """Conv block of stages 1-4: x + DropPath(layer_scale * Mlp(x)); no token mixer, no pre-norm.

  ``remat_mlp`` ('none' | 'fc2_input' | 'all'): in training, the Mlp runs under `nn.remat`,
  keeping only what it tags (``Mlp.remat``): its second (or both) GELU outputs are recomputed in
  the backward pass from the BatchNorm inputs kept anyway (ComputeOptions.remat_mlp).
  """

  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  layer_scale_init: float = 1e-5
  depthwise_impl: ops.DepthwiseImpl = 'auto'
  remat_mlp: RematMlp = 'none'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    train: bool,
    drop_path_rate: jax.Array | None = None,
    drop_noise: jax.Array | None = None,
  ) -> jax.Array:
    """``drop_path_rate``: this block's rate as an array, in place of the field (a stage's
    blocks under `nn.scan`); ``drop_noise``: its row of the model's `DropPathNoise`."""
    features = x.shape[-1]
    layer_scale = self.param(
      'layer_scale',
      nn.initializers.constant(self.layer_scale_init),
      (features,),
      jnp.float32,
    )
    mlp = Mlp
    if self.remat_mlp != 'none' and train:
      policy = jax.checkpoint_policies.save_only_these_names(MLP_SAVED)
      mlp = nn.remat(Mlp, static_argnums=(2,), policy=policy)  # (self, x, train)
    y = mlp(
      int(features * self.mlp_ratio),
      remat=self.remat_mlp,
      depthwise_impl=self.depthwise_impl,
      dtype=self.dtype,
      name='mlp',
    )(x, train)
    y = (y * layer_scale).astype(self.dtype)
    rate = self.drop_path if drop_path_rate is None else drop_path_rate
    return x + drop_path(rate, y, train, drop_noise)


class Downsample(nn.Module):
  """`Embedding`: 3x3 stride-2 conv (pad 1) + BN, no activation."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, 3, stride=2, in_features=x.shape[-1], dtype=self.dtype, name='proj')(x)
    return BatchNorm(dtype=self.dtype, name='norm')(x, train)


class Stem(nn.Module):
  """Two 3x3 stride-2 convs with BN and ReLU (GELU in the segmentation backbone): /4."""

  features: int
  activation: str = 'relu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.activation not in ('relu', 'gelu'):
      raise ValueError(f"stem activation must be 'relu' or 'gelu', got {self.activation!r}")
    mid = self.features // 2
    x = conv(
      mid,
      3,
      stride=2,
      in_features=x.shape[-1],
      dtype=self.dtype,
      name='conv1',
      kernel_init=lecun_normal_init,
      bias_init=nn.initializers.zeros,
    )(x)
    x = BatchNorm(activation=self.activation, dtype=self.dtype, name='bn1')(x, train)
    x = conv(
      self.features,
      3,
      stride=2,
      in_features=mid,
      dtype=self.dtype,
      name='conv2',
      kernel_init=lecun_normal_init,
      bias_init=nn.initializers.zeros,
    )(x)
    return BatchNorm(activation=self.activation, dtype=self.dtype, name='bn2')(x, train)
