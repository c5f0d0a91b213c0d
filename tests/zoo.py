"""Small definitions of today's vision model families, written for this project after the
published architectures (the structure and the torch calls of the common reference
implementations, with few channels), for the import tests and the import benchmark.

Each factory returns a freshly initialised module; ``FAMILIES`` maps a name to (factory, input
shape); ``TOKENS`` gives the vocabulary of the token models (their input holds token ids). No torchvision: everything is written here.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from graphgrow.ops.norm import StochasticDepth


def conv_bn(cin, cout, kernel, stride=1, groups=1, act=nn.ReLU, eps=1e-5):
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=eps)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


# -- ResNet -------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block, layers, widths=(8, 16, 32, 64), classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = widths[0], []
        for index, (width, count) in enumerate(zip(widths, layers)):
            blocks = []
            for k in range(count):
                blocks.append(block(cin, width, 2 if index > 0 and k == 0 else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# -- VGG ----------------------------------------------------------------------------------------
class VGG(nn.Module):
    def __init__(self, config=(8, "M", 16, "M", 32, 32, "M", 32, 32, "M", 32, 32, "M"), classes=10):
        super().__init__()
        layers, cin = [], 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                cin = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(cin * 49, 64), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# -- DenseNet -----------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, inputs):
        bottleneck = self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers, cin, growth, bn_size):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, init_features):
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, growth=4, blocks=(2, 2, 2), init=8, bn_size=2, classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, init, 7, 2, 3, bias=False), nn.BatchNorm2d(init),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        channels = init
        for i, count in enumerate(blocks):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(count, channels, growth, bn_size))
            channels += count * growth
            if i != len(blocks) - 1:
                self.features.add_module(f"transition{i + 1}", nn.Sequential(
                    nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels // 2, 1, bias=False),
                    nn.AvgPool2d(2, 2)))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


# -- GoogLeNet ----------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pool):
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, 1), BasicConv2d(c3r, c3, 3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, 1), BasicConv2d(c5r, c5, 3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = BasicConv2d(3, 8, 7, 2, 3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = BasicConv2d(8, 8, 1)
        self.conv3 = BasicConv2d(8, 16, 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = Inception(16, 4, 4, 8, 2, 4, 4)
        self.inception3b = Inception(20, 8, 4, 8, 2, 4, 4)
        self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = Inception(24, 8, 4, 8, 2, 4, 4)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        x = self.inception4a(self.maxpool3(self.inception3b(self.inception3a(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


# -- SqueezeNet 1.1 -----------------------------------------------------------------------------
class Fire(nn.Module):
    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.squeeze, self.squeeze_activation = nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True)
        self.expand1x1, self.expand1x1_activation = nn.Conv2d(squeeze, e1, 1), nn.ReLU(inplace=True)
        self.expand3x3, self.expand3x3_activation = nn.Conv2d(squeeze, e3, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 4, 8, 8), Fire(16, 4, 8, 8), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(16, 8, 16, 16))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(32, classes, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


# -- MobileNetV2 --------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes=10, settings=((1, 8, 1, 1), (6, 8, 2, 2), (6, 16, 2, 2))):
        super().__init__()
        features, cin = [conv_bn(3, 8, 3, 2, act=nn.ReLU6)], 8
        for expand, cout, count, stride in settings:
            for k in range(count):
                features.append(InvertedResidual(cin, cout, stride if k == 0 else 1, expand))
                cin = cout
        features.append(conv_bn(cin, 32, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# -- ShuffleNetV2 -------------------------------------------------------------------------------
def channel_shuffle(x, groups: int):
    batchsize, num_channels, height, width = x.size()
    x = x.view(batchsize, groups, num_channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, branch, 1))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(conv_bn(cin if stride > 1 else branch, branch, 1),
                                     conv_bn(branch, branch, 3, stride, groups=branch, act=None),
                                     conv_bn(branch, branch, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats=(2, 2), channels=(8, 16, 32, 64), classes=10):
        super().__init__()
        self.conv1 = conv_bn(3, channels[0], 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = channels[0], []
        for count, cout in zip(repeats, channels[1:]):
            stages.append(nn.Sequential(*[ShuffleUnit(cin if k == 0 else cout, cout, 2 if k == 0 else 1)
                                          for k in range(count)]))
            cin = cout
        self.stage2, self.stage3 = stages
        self.conv5 = conv_bn(cin, channels[-1], 1)
        self.fc = nn.Linear(channels[-1], classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.maxpool(self.conv1(x))))
        return self.fc(self.conv5(x).mean([2, 3]))


# -- EfficientNet -------------------------------------------------------------------------------
class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.SiLU(), nn.Sigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class MBConv(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand, drop):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = [conv_bn(cin, hidden, 1, act=nn.SiLU, eps=1e-3)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU, eps=1e-3),
                   SqueezeExcitation(hidden, max(1, cin // 4)), conv_bn(hidden, cout, 1, act=None, eps=1e-3)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop)

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNet(nn.Module):
    def __init__(self, classes=10, settings=((1, 3, 1, 8, 8, 1), (6, 3, 2, 8, 16, 2), (6, 5, 2, 16, 24, 2)),
                 drop=0.2):
        super().__init__()
        layers = [conv_bn(3, 8, 3, 2, act=nn.SiLU, eps=1e-3)]
        total, seen = sum(s[-1] for s in settings), 0
        for expand, kernel, stride, cin, cout, count in settings:
            for k in range(count):
                layers.append(MBConv(cin if k == 0 else cout, cout, kernel, stride if k == 0 else 1, expand,
                                     drop * seen / total))
                seen += 1
        layers.append(conv_bn(24, 48, 1, act=nn.SiLU, eps=1e-3))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(48, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# -- ConvNeXt -----------------------------------------------------------------------------------
class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an image: channels last, F.layer_norm with the module's
    own weights, channels first again."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def layer_norm_2d(channels):
    return LayerNorm2d(channels, eps=1e-6)


class CNBlock(nn.Module):
    def __init__(self, dim, layer_scale, drop):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(drop)

    def forward(self, x):
        result = self.layer_scale * self.block(x)
        return self.stochastic_depth(result) + x


class ConvNeXt(nn.Module):
    def __init__(self, dims=(8, 16), depths=(2, 2), classes=10, drop=0.1):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), layer_norm_2d(dims[0]))]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(dim, 0.5, drop * (i + k) / 4) for k in range(depth)]))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(layer_norm_2d(dim), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(layer_norm_2d(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


# -- Vision transformer -------------------------------------------------------------------------
class EncoderBlock(nn.Module):
    def __init__(self, heads, dim, mlp_dim, dropout=0.1):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, input):
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image=16, patch=4, layers=2, heads=2, dim=16, mlp_dim=32, classes=10, dropout=0.1):
        super().__init__()
        self.patch_size, self.hidden_dim = patch, dim
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        tokens = (image // patch) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.empty(1, tokens, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(*[EncoderBlock(heads, dim, mlp_dim, dropout) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.heads = nn.Sequential(nn.Linear(dim, classes))

    def forward(self, x):
        n, c, h, w = x.shape
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, (h // self.patch_size) * (w // self.patch_size))
        x = x.permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.ln(self.layers(self.dropout(x + self.pos_embedding)))
        return self.heads(x[:, 0])


# -- Token transformer (GPT-style, causal) ---------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """The functional form: one projection to q, k, v, heads by view/transpose, and
    F.scaled_dot_product_attention with is_causal."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        n, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.dim, dim=2)
        q, k, v = (z.view(n, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(n, t, c))


class TokenBlock(nn.Module):
    """A pre-norm causal block: nn.MultiheadAttention with the causal mask as a buffer (and
    is_causal), or the functional form above; then the MLP."""

    def __init__(self, tokens, dim, heads, functional, dropout=0.1):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.functional = functional
        if functional:
            self.attn = CausalSelfAttention(dim, heads)
        else:
            self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
            self.register_buffer("causal", torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), 1))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x):
        h = self.ln_1(x)
        if self.functional:
            x = x + self.attn(h)
        else:
            x = x + self.attn(h, h, h, attn_mask=self.causal, is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TokenTransformer(nn.Module):
    """Token embedding, learned position embedding, one block of each attention form, final
    norm, a classifier on the last token."""

    def __init__(self, vocabulary=50, tokens=8, dim=16, heads=2, classes=10):
        super().__init__()
        self.wte = nn.Embedding(vocabulary, dim)
        self.wpe = nn.Parameter(torch.empty(1, tokens, dim).normal_(std=0.02))
        self.drop = nn.Dropout(0.1)
        self.blocks = nn.Sequential(TokenBlock(tokens, dim, heads, False), TokenBlock(tokens, dim, heads, True))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, idx):
        x = self.blocks(self.drop(self.wte(idx) + self.wpe))
        return self.head(self.ln_f(x)[:, -1])


class NanoGPT(nn.Module):
    """After nanoGPT: token and position embeddings (positions from torch.arange of the input's
    length), pre-norm blocks of causal self-attention (one qkv linear, split, heads by view and
    transpose, F.scaled_dot_product_attention) and a GELU MLP, a final layer norm and an output
    layer per token. ``tied``: the output layer shares the token table, as nanoGPT's does (the
    importer refuses that: graphgrow layers hold their own tensors)."""

    def __init__(self, vocabulary=50, block_size=12, dim=16, heads=2, layers=2, tied=False):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.wte, self.wpe = nn.Embedding(vocabulary, dim), nn.Embedding(block_size, dim)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList(GPTBlock(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocabulary, bias=False)
        if tied:
            self.wte.weight = self.lm_head.weight

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class GPTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(0.1))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp(self.ln_2(x))


FAMILIES = {
    "resnet_basic": (lambda: ResNet(BasicBlock, (2, 1, 1, 1)), (3, 32, 32)),
    "resnet_bottleneck": (lambda: ResNet(Bottleneck, (2, 1, 1, 1), widths=(4, 8, 8, 8)), (3, 32, 32)),
    "vgg": (VGG, (3, 32, 32)),
    "densenet": (DenseNet, (3, 32, 32)),
    "googlenet": (GoogLeNet, (3, 32, 32)),
    "squeezenet": (SqueezeNet, (3, 32, 32)),
    "mobilenet_v2": (MobileNetV2, (3, 32, 32)),
    "shufflenet_v2": (ShuffleNetV2, (3, 32, 32)),
    "efficientnet": (EfficientNet, (3, 32, 32)),
    "convnext": (ConvNeXt, (3, 32, 32)),
    "vit": (VisionTransformer, (3, 16, 16)),
    "token_transformer": (TokenTransformer, (8,)),
    "nanogpt": (NanoGPT, (8,)),
}
#: families whose input holds token ids: the vocabulary size (import_module(..., tokens=))
TOKENS = {"token_transformer": 50, "nanogpt": 50}


def family_input(name: str, batch: int, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    """A batch for family ``name``: standard normal images, or token ids for a token model."""
    shape = FAMILIES[name][1]
    generator = torch.Generator().manual_seed(seed)
    if name in TOKENS:
        return torch.randint(0, TOKENS[name], (batch, *shape), generator=generator)
    return torch.randn(batch, *shape, dtype=dtype, generator=generator)
