"""The official WaffleIron (valeoai/WaffleIron v0.3, with ScaLR's options), restated in PyTorch
module by module, as the parity tests load it: `embedding.py`, `backbone.py` with the
scatter_reduce projection of `helper_projection.py`, and `segmenter.py`, plus ScaLR's GELU and MLP
head. Its state dict has the official key layout.
"""

import torch
from torch import nn as tnn


class TorchLayerNorm(tnn.LayerNorm):  # myLayerNorm: LayerNorm over the channels of (B, C, N)
  def forward(self, x):
    return super().forward(x.transpose(1, -1)).transpose(1, -1)


class TorchDropPath(tnn.Module):
  def __init__(self, drop_prob=0.0):
    super().__init__()
    self.drop_prob, self.keep_prob = drop_prob, 1 - drop_prob

  def forward(self, x):
    if not self.training or self.drop_prob == 0.0:
      return x
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x.div(self.keep_prob) * (self.keep_prob + torch.rand(shape, dtype=x.dtype)).floor_()


def torch_norm(which, channels):
  return tnn.BatchNorm1d(channels) if which == "batchnorm" else TorchLayerNorm(channels)


class TorchChannelMix(tnn.Module):
  def __init__(self, channels, drop_path_prob, which_norm="batchnorm", gelu=False):
    super().__init__()
    self.norm = torch_norm(which_norm, channels)
    self.mlp = tnn.Sequential(
      tnn.Conv1d(channels, channels, 1),
      tnn.GELU() if gelu else tnn.ReLU(inplace=True),
      tnn.Conv1d(channels, channels, 1),
    )
    self.scale = tnn.Conv1d(channels, channels, 1, bias=False, groups=channels)
    self.drop_path = TorchDropPath(drop_path_prob)

  def forward(self, tokens):
    return tokens + self.drop_path(self.scale(self.mlp(self.norm(tokens))))


class TorchSpatialMix(tnn.Module):
  def __init__(self, channels, grid_shape, drop_path_prob, which_norm="batchnorm", gelu=False):
    super().__init__()
    self.H, self.W = grid_shape
    self.norm = torch_norm(which_norm, channels)
    self.ffn = tnn.Sequential(
      tnn.Conv2d(channels, channels, 3, padding=1, groups=channels),
      tnn.GELU() if gelu else tnn.ReLU(inplace=True),
      tnn.Conv2d(channels, channels, 3, padding=1, groups=channels),
    )
    self.scale = tnn.Conv1d(channels, channels, 1, bias=False, groups=channels)
    self.drop_path = TorchDropPath(drop_path_prob)

  def forward(self, tokens, sp_mat):
    b, c, _ = tokens.shape
    residual = self.norm(tokens)
    flat = torch.zeros((b, c, self.H * self.W), dtype=residual.dtype)
    flat.scatter_reduce_(2, sp_mat["inflate"], residual, "mean", include_self=False)
    residual = self.ffn(flat.reshape(b, c, self.H, self.W))
    residual = self.scale(residual.reshape(b, c, self.H * self.W))
    residual = torch.gather(residual, 2, sp_mat["inflate"])
    return tokens + self.drop_path(residual)


class TorchWaffleIron(tnn.Module):
  def __init__(self, channels, depth, grids_shape, drop_path_prob, which_norm, gelu):
    super().__init__()
    self.grids_shape = grids_shape
    self.channel_mix = tnn.ModuleList(
      [TorchChannelMix(channels, drop_path_prob, which_norm, gelu) for _ in range(depth)]
    )
    self.spatial_mix = tnn.ModuleList(
      [
        TorchSpatialMix(
          channels, grids_shape[d % len(grids_shape)], drop_path_prob, which_norm, gelu
        )
        for d in range(depth)
      ]
    )

  def forward(self, tokens, cell_ind, occupied_cell):
    c = tokens.shape[1]
    sp_mat = [
      {"inflate": cell_ind[:, i : i + 1].expand(-1, c, -1)} for i in range(cell_ind.shape[1])
    ]
    for d, (smix, cmix) in enumerate(zip(self.spatial_mix, self.channel_mix, strict=True)):
      tokens = cmix(smix(tokens, sp_mat[d % len(sp_mat)]))
    return tokens


class TorchEmbedding(tnn.Module):
  def __init__(self, channels_in, channels_out):
    super().__init__()
    self.norm = tnn.BatchNorm1d(channels_in)
    self.conv1 = tnn.Conv1d(channels_in, channels_out, 1)
    self.conv2 = tnn.Sequential(
      tnn.BatchNorm2d(channels_in),
      tnn.Conv2d(channels_in, channels_out, 1, bias=False),
      tnn.BatchNorm2d(channels_out),
      tnn.ReLU(inplace=True),
      tnn.Conv2d(channels_out, channels_out, 1, bias=False),
    )
    self.final = tnn.Conv1d(2 * channels_out, channels_out, 1, bias=True, padding=0)

  def forward(self, x, neighbors):
    x = self.norm(x)
    point_emb = self.conv1(x)
    gather = []
    for ind_nn in range(1, neighbors.shape[1]):  # column 0 is the point itself
      temp = neighbors[:, ind_nn : ind_nn + 1, :].expand(-1, x.shape[1], -1)
      gather.append(torch.gather(x, 2, temp).unsqueeze(-1))
    neigh_emb = torch.cat(gather, -1) - x.unsqueeze(-1)
    neigh_emb = self.conv2(neigh_emb).max(-1)[0]
    return self.final(torch.cat((point_emb, neigh_emb), dim=1))


class TorchSegmenter(tnn.Module):
  def __init__(self, input_channels, feat_channels, nb_class, depth, grid_shape,
               drop_path_prob=0, which_norm="batchnorm", gelu=False, mlp_hidden_size=None):  # fmt: skip
    super().__init__()
    self.embed = TorchEmbedding(input_channels, feat_channels)
    self.waffleiron = TorchWaffleIron(
      feat_channels, depth, grid_shape, drop_path_prob, which_norm, gelu
    )
    if mlp_hidden_size:
      self.classif = tnn.Sequential(
        tnn.Conv1d(feat_channels, mlp_hidden_size, 1),
        tnn.ReLU(inplace=True),
        tnn.Conv1d(mlp_hidden_size, nb_class, 1),
      )
    else:
      self.classif = tnn.Conv1d(feat_channels, nb_class, 1)

  def forward(self, feats, cell_ind, occupied_cell, neighbors):
    tokens = self.embed(feats, neighbors)
    return self.classif(self.waffleiron(tokens, cell_ind, occupied_cell))


def randomise_norms(model: tnn.Module, seed: int) -> tnn.Module:
  """Affine parameters and running statistics away from their defaults."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, tnn.BatchNorm1d | tnn.BatchNorm2d | tnn.LayerNorm):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
      if isinstance(m, tnn.BatchNorm1d | tnn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
  return model
