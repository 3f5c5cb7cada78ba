"""Typed layer specs: one frozen dataclass per Darknet section kind, with Darknet's defaults.

Each spec class registers the section names it handles (``[conv]`` and ``[convolutional]`` share
one). ``Spec.parse(options, ctx)`` reads the section the way darknet's ``parse_*`` function does,
validates it against the layers before it and computes the output shape. Specs are torch-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

from .errors import DarknetCfgError
from .options import Options

FLT_MAX = 3.4028234663852886e38

# Every activation name darknet's get_activation() knows.
ACTIVATIONS = (
    "logistic", "loggy", "relu", "relu6", "elu", "selu", "gelu", "relie", "plse", "hardtan",
    "lhtan", "linear", "ramp", "revleaky", "leaky", "tanh", "stair", "swish", "mish",
    "hard_mish", "normalize_channels", "normalize_channels_softmax",
    "normalize_channels_softmax_maxval",
)
# Options darknet's parse_network_cfg reads for every layer (after the type's own parse_*).
COMMON_KEYS = ("clip", "onlyforward", "dont_update", "burnin_update", "stopbackward",
               "train_only_bn", "dontload", "dontloadscales", "learning_rate")


@dataclass(frozen=True)
class Shape:
    """Darknet's (c, h, w) of one image."""
    c: int
    h: int
    w: int

    @property
    def numel(self) -> int:
        return self.c * self.h * self.w

    def as_list(self) -> List[int]:
        return [self.c, self.h, self.w]


@dataclass
class Context:
    """What a section's parser may look at: its index, the [net] settings, earlier layers."""
    index: int
    net: "NetSpec"
    layers: List["LayerSpec"]
    options: Options = None

    @property
    def input(self) -> Shape:
        """Shape of the previous layer's output (the network input for layer 0)."""
        return self.layers[-1].out_shape if self.layers else self.net.input_shape

    @property
    def inputs(self) -> int:
        """Darknet's params.inputs: flat size of the previous output."""
        return self.layers[-1].outputs if self.layers else self.net.inputs

    def layer_ref(self, value: int, key: str, relative_only_if_negative: bool = True) -> int:
        """Absolute index of a layer reference (negative = relative, as in darknet)."""
        index = self.index + value if value < 0 else value
        if not 0 <= index < self.index:
            allowed = f"only use layers 0..{self.index - 1}" if self.index else \
                "use no earlier layer"
            raise self.options.error(f"layer {value} is out of range (resolves to {index}; "
                                     f"layer {self.index} can {allowed})", key)
        return index


@dataclass(frozen=True)
class NetSpec:
    """The [net] section: input size plus the training settings, with darknet's defaults."""
    width: int
    height: int
    channels: int
    inputs: int
    batch: int
    subdivisions: int
    letter_box: int
    settings: Dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def input_shape(self) -> Shape:
        return Shape(self.channels, self.height, self.width)


# (key, kind, default) for the [net] options darknet reads (parse_net_options), besides the size.
NET_OPTIONS = (
    ("max_batches", "int", 0), ("learning_rate", "float", 0.001),
    ("learning_rate_min", "float", 0.00001), ("sgdr_cycle", "int", None), ("sgdr_mult", "int", 2),
    ("momentum", "float", 0.9), ("decay", "float", 0.0001), ("time_steps", "int", 1),
    ("track", "int", 0), ("augment_speed", "int", 2), ("sequential_subdivisions", "int", None),
    ("try_fix_nan", "int", 0), ("weights_reject_freq", "int", 0), ("equidistant_point", "int", 0),
    ("badlabels_rejection_percentage", "float", 0.0), ("num_sigmas_reject_badlabels", "float", 0.0),
    ("ema_alpha", "float", 0.0), ("use_cuda_graph", "int", 0), ("loss_scale", "float", 1.0),
    ("dynamic_minibatch", "int", 0), ("optimized_memory", "int", 0),
    ("workspace_size_limit_MB", "float", 1024.0), ("adam", "int", 0), ("B1", "float", 0.9),
    ("B2", "float", 0.999), ("eps", "float", 0.000001), ("max_crop", "int", None),
    ("min_crop", "int", None), ("flip", "int", 1), ("blur", "int", 0), ("gaussian_noise", "int", 0),
    ("mixup", "int", 0), ("cutmix", "int", 0), ("mosaic", "int", 0), ("mosaic_bound", "int", 0),
    ("contrastive", "int", 0), ("contrastive_jit_flip", "int", 0), ("contrastive_color", "int", 0),
    ("unsupervised", "int", 0), ("label_smooth_eps", "float", 0.0), ("resize_step", "float", 32.0),
    ("attention", "int", 0), ("adversarial_lr", "float", 0.0), ("max_chart_loss", "float", 20.0),
    ("angle", "float", 0.0), ("aspect", "float", 1.0), ("saturation", "float", 1.0),
    ("exposure", "float", 1.0), ("hue", "float", 0.0), ("power", "float", 4.0),
    ("policy", "str", "constant"), ("burn_in", "int", 0), ("step", "int", 1), ("scale", "float", 1.0),
    ("steps", "ints", None), ("scales", "floats", None), ("seq_scales", "floats", None),
    ("gamma", "float", 1.0), ("show_receptive_field", "float", 0.0),
)
POLICIES = ("random", "poly", "constant", "step", "exp", "sigmoid", "steps", "sgdr")


def parse_net(o: Options) -> NetSpec:
    """[net]/[network] (darknet's parse_net_options)."""
    settings: Dict[str, object] = {}
    for key, kind, default in NET_OPTIONS:
        getter = getattr(o, kind)
        settings[key] = getter(key, default) if default is not None or kind in ("ints", "floats") \
            else (getter(key) if o.has(key) else None)
    batch = o.int("batch", 1)
    subdivisions = o.int("subdivisions", 1)
    if subdivisions < 1:
        raise o.error("subdivisions must be >= 1", "subdivisions")
    height = o.int("height", 0)
    width = o.int("width", 0)
    channels = o.int("channels", 0)
    inputs = o.int("inputs", height * width * channels)
    if not inputs and not (height and width and channels):
        raise o.error("no input size: set width, height and channels (or inputs)")
    if settings["policy"] not in POLICIES:
        o.warn(f"unknown policy {settings['policy']!r}; Darknet falls back to constant", "policy")
    if settings["policy"] == "steps" and (settings["steps"] is None or settings["scales"] is None):
        raise o.error("policy=steps needs both steps= and scales=", "policy")
    settings.update(batch=batch, subdivisions=subdivisions)
    return NetSpec(width, height, channels, inputs, batch, subdivisions,
                   o.int("letter_box", 0), settings)


# ------------------------------------------------------------------------------------ registry
SPECS: Dict[str, Type["LayerSpec"]] = {}


def register(*sections: str) -> Callable[[Type["LayerSpec"]], Type["LayerSpec"]]:
    """Register a spec class under darknet section names; a duplicate name raises."""
    def wrap(cls):
        for name in sections:
            if name in SPECS:
                raise KeyError(f"section [{name}] registered twice")
            SPECS[name] = cls
        cls.sections = sections
        return cls
    return wrap


@dataclass(frozen=True)
class LayerSpec:
    """Fields every layer has. ``inputs`` are the absolute layer indices the layer reads
    (-1 = the network input); the first one is the 'previous' layer unless stated otherwise."""
    index: int
    section: str
    line: int
    inputs: Tuple[int, ...]
    in_shape: Shape
    out_shape: Shape
    dontload: int = 0
    dontloadscales: int = 0
    stopbackward: int = 0

    type: ClassVar[str] = "?"
    sections: ClassVar[Tuple[str, ...]] = ()
    flat: ClassVar[bool] = False  # darknet reports no (c,h,w) for the output, only a count

    @classmethod
    def parse(cls, o: Options, ctx: Context) -> "LayerSpec":
        raise NotImplementedError

    @classmethod
    def base(cls, o: Options, ctx: Context, out_shape: Shape, inputs=None, in_shape=None):
        """Common fields, including the keys darknet reads for every layer."""
        common = {k: (o.float(k, 1.0 if k == "learning_rate" else 0.0)
                      if k in ("clip", "learning_rate") else o.int(k, 0)) for k in COMMON_KEYS}
        return dict(index=ctx.index, section=o.name, line=o.section.line,
                    inputs=tuple(inputs) if inputs is not None else (ctx.index - 1,),
                    in_shape=in_shape or ctx.input, out_shape=out_shape,
                    dontload=common["dontload"], dontloadscales=common["dontloadscales"],
                    stopbackward=common["stopbackward"])

    @property
    def outputs(self) -> int:
        return self.out_shape.numel

    def weight_segments(self) -> List[Tuple[str, int]]:
        """(name, float count) of what load_weights reads for this layer, in file order."""
        return []

    @property
    def weight_floats(self) -> int:
        return sum(n for _, n in self.weight_segments())

    @property
    def bflops(self) -> float:
        return 0.0

    def describe(self) -> str:
        """The 'filters size/strd(dil)' columns of darknet's layer table."""
        return ""


def _activation(o: Options, default: str, key: str = "activation") -> str:
    name = o.str(key, default)
    if name not in ACTIVATIONS:
        raise o.error(f"unknown activation {name!r}", key)
    return name


def _tree(o: Options) -> Optional[Tuple[str, Optional[str]]]:
    """(tree= value, resolved file or None) of a hierarchical softmax."""
    from .tree import resolve_tree_path
    value = o.str("tree")
    if value is None:
        return None
    found = resolve_tree_path(value, o.path)
    if found is None:
        o.warn(f"class tree {value!r} not found (looked in the working folder and beside the "
               "cfg); this layer cannot run forward until the file is there", "tree")
    return value, found


def _need_image(o: Options, ctx: Context, what: str) -> Shape:
    s = ctx.input
    if not (s.c and s.h and s.w):
        raise o.error(f"the layer before a [{what}] layer must output an image (c, h, w), "
                      f"got {s.as_list()}")
    return s


def _check_positive(o: Options, **values) -> None:
    for key, value in values.items():
        if value < 1:
            raise o.error(f"must be >= 1, got {value}", key)


# --------------------------------------------------------------------------------- convolution
@dataclass(frozen=True)
class ConvParams:
    """One convolution as darknet's make_convolutional_layer sees it (also crnn sub-layers)."""
    c: int
    filters: int
    size: int
    stride_x: int
    stride_y: int
    dilation: int
    pad: int  # the padding actually used (size/2 when pad=1)
    groups: int
    batch_normalize: int
    activation: str
    h: int = 0
    w: int = 0

    @property
    def out_h(self) -> int:
        # darknet: output size ignores the dilation; the padding applied is pad*dilation
        return (self.h + 2 * self.pad - self.size) // self.stride_y + 1

    @property
    def out_w(self) -> int:
        return (self.w + 2 * self.pad - self.size) // self.stride_x + 1

    @property
    def nweights(self) -> int:
        return self.filters * (self.c // self.groups) * self.size * self.size

    def segments(self, prefix: str = "", dontloadscales: int = 0) -> List[Tuple[str, int]]:
        n = self.filters
        segs = [(prefix + "biases", n)]
        if self.batch_normalize and not dontloadscales:
            segs += [(prefix + "scales", n), (prefix + "rolling_mean", n),
                     (prefix + "rolling_variance", n)]
        return segs + [(prefix + "weights", self.nweights)]

    @property
    def bflops(self) -> float:
        return 2.0 * self.nweights * self.out_h * self.out_w / 1e9

    def validate(self, o: Options) -> None:
        _check_positive(o, filters=self.filters, size=self.size, stride=min(self.stride_x,
                        self.stride_y), groups=self.groups)
        if self.c % self.groups:
            raise o.error(f"groups={self.groups} does not divide the {self.c} input channels",
                          "groups")
        if self.filters % self.groups:
            raise o.error(f"groups={self.groups} does not divide filters={self.filters}", "groups")
        if self.out_h < 1 or self.out_w < 1:
            raise o.error(f"output would be empty ({self.h}x{self.w} input, size={self.size}, "
                          f"pad={self.pad})", "size")


@register("convolutional", "conv")
@dataclass(frozen=True)
class ConvolutionalSpec(LayerSpec):
    conv: ConvParams = None
    binary: int = 0
    xnor: int = 0
    flipped: int = 0
    share_index: Optional[int] = None
    type: ClassVar[str] = "convolutional"

    @classmethod
    def parse(cls, o, ctx):
        s = _need_image(o, ctx, "convolutional")
        filters = o.int("filters", 1)
        groups = o.int("groups", 1)
        size = o.int("size", 1)
        # darknet: stride is read only unless both stride_x and stride_y are given
        stride_x = o.int("stride_x", -1)
        stride_y = o.int("stride_y", -1)
        stride = o.int("stride", 1)
        stride_x = stride if stride_x < 1 else stride_x
        stride_y = stride if stride_y < 1 else stride_y
        dilation = o.int("dilation", 1)
        if size == 1:
            dilation = 1  # darknet: size=1 forces dilation=1
        pad = o.int("pad", 0)
        padding = o.int("padding", 0)
        if pad:
            padding = size // 2
        activation = _activation(o, "logistic")
        bn = o.int("batch_normalize", 0)
        if o.int("cbn", 0):
            bn = 2
        unsupported = [k for k in ("antialiasing", "sway", "rotate", "stretch", "stretch_sway",
                                   "coordconv") if o.int(k, 0)]
        if unsupported:
            raise o.error(f"{unsupported[0]}=1 is not supported by darknet_cfg yet", unsupported[0])
        for k, kind in (("assisted_excitation", "float"), ("bin_output", "int"), ("dot", "float"),
                        ("angle", "float"), ("grad_centr", "int"), ("reverse", "float"),
                        ("stream", "int"), ("wait_stream", "int")):
            getattr(o, kind)(k, 0)
        share = None
        if o.has("share_index"):
            share = ctx.layer_ref(o.int("share_index"), "share_index")
            other = ctx.layers[share]
            if not isinstance(other, ConvolutionalSpec):
                raise o.error(f"share_index={share} is a [{other.section}], not a convolution",
                              "share_index")
        conv = ConvParams(s.c, filters, size, stride_x, stride_y, dilation, padding, groups, bn,
                          activation, s.h, s.w)
        conv.validate(o)
        if share is not None:
            o_conv = ctx.layers[share].conv
            if (o_conv.c, o_conv.filters, o_conv.size, o_conv.groups, bool(o_conv.batch_normalize)) \
                    != (conv.c, conv.filters, conv.size, conv.groups, bool(conv.batch_normalize)):
                raise o.error(f"share_index={share}: that layer's weights have another shape",
                              "share_index")
        return cls(**cls.base(o, ctx, Shape(filters, conv.out_h, conv.out_w)), conv=conv,
                   binary=o.int("binary", 0), xnor=o.int("xnor", 0), flipped=o.int("flipped", 0),
                   share_index=share)

    def weight_segments(self):
        return [] if self.share_index is not None else self.conv.segments("", self.dontloadscales)

    @property
    def bflops(self):
        # darknet counts an XNOR convolution as 1/32 of the float operations
        return self.conv.bflops / 32 if self.xnor else self.conv.bflops

    def describe(self):
        c = self.conv
        g = f"{c.filters:5d}/{c.groups:3d}" if c.groups > 1 else f"{c.filters:5d}    "
        stride = f"{c.stride_x}" if c.stride_x == c.stride_y else f"{c.stride_x}x{c.stride_y}"
        dil = f"({c.dilation})" if c.dilation > 1 else ""
        kind = "conv" if not (self.xnor or self.binary) else "xnor" if self.xnor else "bin "
        return f"{kind} {g} {c.size:2d} x{c.size:2d}/{stride:>2s}{dil}"


@register("local")
@dataclass(frozen=True)
class LocalSpec(LayerSpec):
    """[local]: a convolution with separate weights at every output position."""
    filters: int = 1
    size: int = 1
    stride: int = 1
    pad: int = 0  # darknet: a flag; padding = size/2 when set
    activation: str = "logistic"
    type: ClassVar[str] = "local"

    @classmethod
    def parse(cls, o, ctx):
        s = _need_image(o, ctx, "local")
        filters, size, stride = o.int("filters", 1), o.int("size", 1), o.int("stride", 1)
        pad = o.int("pad", 0)
        _check_positive(o, filters=filters, size=size, stride=stride)
        # darknet's local_out_height: h - size (no pad) or h - 1 (pad), then /stride + 1
        out_h = (s.h - (1 if pad else size)) // stride + 1
        out_w = (s.w - (1 if pad else size)) // stride + 1
        return cls(**cls.base(o, ctx, Shape(filters, out_h, out_w)), filters=filters, size=size,
                   stride=stride, pad=pad, activation=_activation(o, "logistic"))

    @property
    def padding(self) -> int:
        return self.size // 2 if self.pad else 0

    def weight_segments(self):
        locations = self.out_shape.h * self.out_shape.w
        return [("biases", self.outputs),
                ("weights", self.size * self.size * self.in_shape.c * self.filters * locations)]

    def describe(self):
        return f"local{self.filters:5d}    {self.size:2d} x{self.size:2d}/{self.stride:2d}"


@register("connected", "conn")
@dataclass(frozen=True)
class ConnectedSpec(LayerSpec):
    output: int = 1
    activation: str = "logistic"
    batch_normalize: int = 0
    type: ClassVar[str] = "connected"

    @classmethod
    def parse(cls, o, ctx):
        output = o.int("output", 1)
        _check_positive(o, output=output)
        flat_in = Shape(ctx.inputs, 1, 1)
        return cls(**cls.base(o, ctx, Shape(output, 1, 1), in_shape=flat_in), output=output,
                   activation=_activation(o, "logistic"), batch_normalize=o.int("batch_normalize", 0))

    def weight_segments(self):
        n = self.output
        segs = [("biases", n), ("weights", n * self.in_shape.c)]
        if self.batch_normalize and not self.dontloadscales:  # darknet: BN after the weights
            segs += [("scales", n), ("rolling_mean", n), ("rolling_variance", n)]
        return segs

    def describe(self):
        return f"connected    {self.in_shape.c:5d} -> {self.output:5d}"


@register("batchnorm")
@dataclass(frozen=True)
class BatchnormSpec(LayerSpec):
    type: ClassVar[str] = "batchnorm"

    @classmethod
    def parse(cls, o, ctx):
        return cls(**cls.base(o, ctx, ctx.input))

    def weight_segments(self):
        c = self.out_shape.c
        return [("biases", c), ("scales", c), ("rolling_mean", c), ("rolling_variance", c)]


@register("crnn")
@dataclass(frozen=True)
class CrnnSpec(LayerSpec):
    """[crnn]: input conv + recurrent (self) conv + output conv, hidden state added between."""
    input_layer: ConvParams = None
    self_layer: ConvParams = None
    output_layer: ConvParams = None
    steps: int = 1
    shortcut: int = 0
    type: ClassVar[str] = "crnn"

    @classmethod
    def parse(cls, o, ctx):
        s = _need_image(o, ctx, "crnn")
        size, stride = o.int("size", 3), o.int("stride", 1)
        dilation = o.int("dilation", 1)
        pad, padding = o.int("pad", 0), o.int("padding", 0)
        if pad:
            padding = size // 2
        output, hidden = o.int("output", 1), o.int("hidden", 1)
        groups = o.int("groups", 1)
        act = _activation(o, "logistic")
        bn = o.int("batch_normalize", 0)
        o.int("xnor", 0)
        mk = lambda c, n, h, w: ConvParams(c, n, size, stride, stride, dilation, padding, groups,
                                           bn, act, h, w)
        inp = mk(s.c, hidden, s.h, s.w)
        inp.validate(o)
        slf = mk(hidden, hidden, inp.out_h, inp.out_w)
        out = mk(hidden, output, inp.out_h, inp.out_w)
        return cls(**cls.base(o, ctx, Shape(output, out.out_h, out.out_w)), input_layer=inp,
                   self_layer=slf, output_layer=out, steps=ctx.net.settings["time_steps"],
                   shortcut=o.int("shortcut", 0))

    def weight_segments(self):
        return (self.input_layer.segments("input_layer.") + self.self_layer.segments("self_layer.")
                + self.output_layer.segments("output_layer."))

    @property
    def bflops(self):
        return self.input_layer.bflops + self.self_layer.bflops + self.output_layer.bflops


# ------------------------------------------------------------------------------------- pooling
@register("maxpool", "max")
@dataclass(frozen=True)
class MaxpoolSpec(LayerSpec):
    size: int = 1
    stride_x: int = 1
    stride_y: int = 1
    padding: int = 0  # darknet: TOTAL padding, default size-1; window starts at -padding/2
    maxpool_depth: int = 0
    out_channels: int = 1
    type: ClassVar[str] = "maxpool"
    avgpool: ClassVar[bool] = False

    @classmethod
    def parse(cls, o, ctx):
        s = _need_image(o, ctx, cls.type)
        stride = o.int("stride", 1)
        stride_x, stride_y = o.int("stride_x", stride), o.int("stride_y", stride)
        size = o.int("size", stride)
        padding = o.int("padding", size - 1)
        depth = out_channels = 0
        if not cls.avgpool:
            depth, out_channels = o.int("maxpool_depth", 0), o.int("out_channels", 1)
            if o.int("antialiasing", 0):
                raise o.error("antialiasing=1 is not supported by darknet_cfg yet", "antialiasing")
            o.int("maxpool_zero_nonmax", 0)
        _check_positive(o, size=size, stride=min(stride_x, stride_y))
        if depth:
            if out_channels < 1:
                raise o.error("out_channels must be >= 1", "out_channels")
            out = Shape(out_channels, s.h, s.w)
        else:
            out = Shape(s.c, (s.h + padding - size) // stride_y + 1,
                        (s.w + padding - size) // stride_x + 1)
        if out.h < 1 or out.w < 1:
            raise o.error(f"output would be empty ({s.h}x{s.w} input, size={size})", "size")
        return cls(**cls.base(o, ctx, out), size=size, stride_x=stride_x, stride_y=stride_y,
                   padding=padding, maxpool_depth=depth, out_channels=out_channels or 1)

    @property
    def bflops(self):
        o = self.out_shape
        return self.size * self.size * self.in_shape.c * o.h * o.w / 1e9

    def describe(self):
        stride = f"{self.stride_x}" if self.stride_x == self.stride_y else \
            f"{self.stride_x}x{self.stride_y}"
        name = "avg " if self.avgpool else "max "
        return f"{name}         {self.size:2d}x{self.size:2d}/{stride:>2s}"


@register("local_avgpool", "local_avg")
@dataclass(frozen=True)
class LocalAvgpoolSpec(MaxpoolSpec):
    """[local_avgpool]: the maxpool geometry, averaging the in-range taps."""
    type: ClassVar[str] = "local_avgpool"
    avgpool: ClassVar[bool] = True


@register("avgpool", "avg")
@dataclass(frozen=True)
class AvgpoolSpec(LayerSpec):
    """[avgpool]: global average over each channel."""
    type: ClassVar[str] = "avgpool"

    @classmethod
    def parse(cls, o, ctx):
        s = _need_image(o, ctx, "avgpool")
        return cls(**cls.base(o, ctx, Shape(s.c, 1, 1)))

    def describe(self):
        return "avg"


# ---------------------------------------------------------------------- routing and merging
@register("route")
@dataclass(frozen=True)
class RouteSpec(LayerSpec):
    """[route]: concatenate along channels; with groups each input gives its group_id-th part."""
    groups: int = 1
    group_id: int = 0
    type: ClassVar[str] = "route"

    @classmethod
    def parse(cls, o, ctx):
        refs = o.ints("layers")
        if not refs:
            raise o.error("required key is missing: route needs layers=", "layers")
        layers = [ctx.layer_ref(v, "layers") for v in refs]
        groups, group_id = o.int("groups", 1), o.int("group_id", 0)
        _check_positive(o, groups=groups)
        if not 0 <= group_id < groups:
            raise o.error(f"group_id={group_id} must be in 0..{groups - 1}", "group_id")
        o.int("stream", -1)
        o.int("wait_stream", -1)
        first = ctx.layers[layers[0]].out_shape
        c = 0
        for i in layers:
            s = ctx.layers[i].out_shape
            if (s.h, s.w) != (first.h, first.w):
                raise o.error(f"cannot concatenate layer {i} ({s.w}x{s.h}) with layer "
                              f"{layers[0]} ({first.w}x{first.h}): sizes differ", "layers")
            if s.c % groups:
                raise o.error(f"groups={groups} does not divide the {s.c} channels of layer {i}",
                              "groups")
            c += s.c
        out = Shape(c // groups, first.h, first.w)
        return cls(**cls.base(o, ctx, out, inputs=layers, in_shape=out), groups=groups,
                   group_id=group_id)

    def describe(self):
        return "route  " + " ".join(str(i) for i in self.inputs) + (
            f"  {self.group_id}/{self.groups}" if self.groups > 1 else "")


@register("shortcut")
@dataclass(frozen=True)
class ShortcutSpec(LayerSpec):
    """[shortcut]: previous output + each `from` layer (optionally weighted), then activation.

    inputs = (previous layer, *from). A `from` layer with other channel counts adds only where
    both have data (darknet adds over the flat index below min(outputs))."""
    activation: str = "linear"
    weights_type: str = "none"
    weights_normalization: str = "none"
    type: ClassVar[str] = "shortcut"

    @classmethod
    def parse(cls, o, ctx):
        act = _activation(o, "linear")
        wt = o.str("weights_type", "none")
        wt = {"per_layer": "per_feature"}.get(wt, wt)
        if wt not in ("none", "per_feature", "per_channel"):
            raise o.error(f"unknown weights_type {wt!r} (none, per_feature, per_channel)",
                          "weights_type")
        wn = o.str("weights_normalization", "none")
        wn = {"avg_relu": "relu"}.get(wn, wn)
        if wn not in ("none", "relu", "softmax"):
            raise o.error(f"unknown weights_normalization {wn!r} (none, relu, softmax)",
                          "weights_normalization")
        refs = o.ints("from")
        if not refs:
            raise o.error("required key is missing: shortcut needs from=", "from")
        src = [ctx.layer_ref(v, "from") for v in refs]
        s = ctx.input
        for i in src:
            f = ctx.layers[i].out_shape
            if (f.h, f.w) != (s.h, s.w):
                raise o.error(f"cannot add layer {i} ({f.w}x{f.h}) to the previous layer "
                              f"({s.w}x{s.h}): sizes differ", "from")
        return cls(**cls.base(o, ctx, s, inputs=(ctx.index - 1, *src)), activation=act,
                   weights_type=wt, weights_normalization=wn)

    @property
    def sources(self) -> Tuple[int, ...]:
        return self.inputs[1:]

    @property
    def nweights(self) -> int:
        n = len(self.sources) + 1
        return {"none": 0, "per_feature": n, "per_channel": n * self.out_shape.c}[self.weights_type]

    def weight_segments(self):
        return [("weights", self.nweights)] if self.nweights else []

    @property
    def bflops(self):
        return self.out_shape.numel * len(self.sources) / 1e9

    def describe(self):
        return "Shortcut Layer: " + ", ".join(str(i) for i in self.sources)


@register("scale_channels")
@dataclass(frozen=True)
class ScaleChannelsSpec(LayerSpec):
    """[scale_channels]: out = layer[from] * previous (a per-channel, or per-pixel, scale)."""
    scale_wh: int = 0
    activation: str = "linear"
    type: ClassVar[str] = "scale_channels"

    @classmethod
    def parse(cls, o, ctx):
        ref = o.ints("from")
        if not ref:
            raise o.error("required key is missing", "from")
        src = ctx.layer_ref(ref[0], "from")
        f = ctx.layers[src].out_shape
        s = ctx.input
        scale_wh = o.int("scale_wh", 0)
        if scale_wh:
            ok = (s.h, s.w) == (f.h, f.w) and s.c == 1
        else:
            ok = s.c == f.c and s.h == 1 and s.w == 1
        if not ok:
            raise o.error(f"cannot scale layer {src} {f.as_list()} by the previous layer "
                          f"{s.as_list()}", "from")
        return cls(**cls.base(o, ctx, f, inputs=(ctx.index - 1, src)), scale_wh=scale_wh,
                   activation=_activation(o, "linear"))

    def describe(self):
        return f"scale Layer: {self.inputs[1]}"


@register("sam")
@dataclass(frozen=True)
class SamSpec(LayerSpec):
    """[sam]: out = previous * layer[from], elementwise."""
    activation: str = "linear"
    type: ClassVar[str] = "sam"

    @classmethod
    def parse(cls, o, ctx):
        ref = o.ints("from")
        if not ref:
            raise o.error("required key is missing", "from")
        src = ctx.layer_ref(ref[0], "from")
        f = ctx.layers[src].out_shape
        if f != ctx.input:
            raise o.error(f"cannot multiply layer {src} {f.as_list()} with the previous layer "
                          f"{ctx.input.as_list()}", "from")
        return cls(**cls.base(o, ctx, f, inputs=(ctx.index - 1, src)),
                   activation=_activation(o, "linear"))

    def describe(self):
        return f"scale Layer: {self.inputs[1]}"


# ------------------------------------------------------------------------- resampling layers
@register("upsample")
@dataclass(frozen=True)
class UpsampleSpec(LayerSpec):
    """[upsample]: nearest neighbour x stride, times scale; stride<0 sums stride x stride blocks."""
    stride: int = 2
    scale: float = 1.0
    type: ClassVar[str] = "upsample"

    @classmethod
    def parse(cls, o, ctx):
        s = _need_image(o, ctx, "upsample")
        stride = o.int("stride", 2)
        if stride == 0:
            raise o.error("stride must not be 0", "stride")
        if stride > 0:
            out = Shape(s.c, s.h * stride, s.w * stride)
        else:
            out = Shape(s.c, s.h // -stride, s.w // -stride)
        return cls(**cls.base(o, ctx, out), stride=stride, scale=o.float("scale", 1.0))

    @property
    def reverse(self) -> bool:
        return self.stride < 0

    def describe(self):
        return ("downsample" if self.reverse else "upsample") + f"         {abs(self.stride):2d}x"


@register("reorg3d")
@dataclass(frozen=True)
class ReorgSpec(LayerSpec):
    """[reorg3d]: space-to-depth (darknet type 'reorg')."""
    stride: int = 1
    reverse: int = 0
    type: ClassVar[str] = "reorg"

    @classmethod
    def parse(cls, o, ctx):
        s = _need_image(o, ctx, o.name)
        stride, reverse = o.int("stride", 1), o.int("reverse", 0)
        _check_positive(o, stride=stride)
        if reverse:
            if s.c % (stride * stride):
                raise o.error(f"{s.c} channels are not divisible by stride^2={stride * stride}",
                              "stride")
            out = Shape(s.c // (stride * stride), s.h * stride, s.w * stride)
        else:
            if s.h % stride or s.w % stride:
                raise o.error(f"input {s.w}x{s.h} is not divisible by stride={stride}", "stride")
            out = Shape(s.c * stride * stride, s.h // stride, s.w // stride)
        return cls(**cls.base(o, ctx, out), stride=stride, reverse=reverse)

    def describe(self):
        return f"reorg              /{self.stride:2d}"


@register("reorg")
@dataclass(frozen=True)
class ReorgOldSpec(ReorgSpec):
    """[reorg]: darknet's historical reorg used by YOLOv2 (type 'reorg_old')."""
    type: ClassVar[str] = "reorg_old"

    @classmethod
    def parse(cls, o, ctx):
        spec = super().parse(o, ctx)
        s, st = spec.in_shape, spec.stride
        if not spec.reverse and s.c % (st * st):
            raise o.error(f"{s.c} channels are not divisible by stride^2={st * st} (reorg_old "
                          "reads the input as (c/stride^2, h*stride, w*stride))", "stride")
        return spec


@register("crop")
@dataclass(frozen=True)
class CropSpec(LayerSpec):
    """[crop]: centre crop at inference (random crop/flip when training); x*2-1 unless noadjust."""
    flip: int = 0
    noadjust: int = 0
    type: ClassVar[str] = "crop"

    @classmethod
    def parse(cls, o, ctx):
        s = _need_image(o, ctx, "crop")
        ch, cw = o.int("crop_height", 1), o.int("crop_width", 1)
        if not (1 <= ch <= s.h and 1 <= cw <= s.w):
            raise o.error(f"crop {cw}x{ch} does not fit the {s.w}x{s.h} input", "crop_width")
        flip = o.int("flip", 0)
        for k, d in (("angle", 0.0), ("saturation", 1.0), ("exposure", 1.0), ("shift", 0.0)):
            o.float(k, d)
        return cls(**cls.base(o, ctx, Shape(s.c, ch, cw)), flip=flip, noadjust=o.int("noadjust", 0))


# ---------------------------------------------------------------------- element-wise layers
@register("activation")
@dataclass(frozen=True)
class ActivationSpec(LayerSpec):
    activation: str = "linear"
    type: ClassVar[str] = "activation"

    @classmethod
    def parse(cls, o, ctx):
        return cls(**cls.base(o, ctx, ctx.input), activation=_activation(o, "linear"))


@register("dropout")
@dataclass(frozen=True)
class DropoutSpec(LayerSpec):
    """[dropout]: identity at inference (darknet shares the previous layer's buffer)."""
    probability: float = 0.2
    type: ClassVar[str] = "dropout"

    @classmethod
    def parse(cls, o, ctx):
        p = o.float("probability", 0.2)
        o.int("dropblock", 0)
        o.float("dropblock_size_rel", 0.0)
        o.float("dropblock_size_abs", 0.0)
        if not 0.0 <= p < 1.0:
            raise o.error(f"probability must be in [0, 1), got {p}", "probability")
        return cls(**cls.base(o, ctx, ctx.input), probability=p)


@register("empty", "silence")
@dataclass(frozen=True)
class EmptySpec(LayerSpec):
    type: ClassVar[str] = "empty"

    @classmethod
    def parse(cls, o, ctx):
        return cls(**cls.base(o, ctx, ctx.input))


@register("implicit")
@dataclass(frozen=True)
class ImplicitSpec(LayerSpec):
    """[implicit]: a learned (filters, 1, 1) tensor, independent of the input (YOLOR)."""
    filters: int = 128
    atoms: int = 1
    mean: float = 0.0
    std: float = 0.2
    type: ClassVar[str] = "implicit"

    @classmethod
    def parse(cls, o, ctx):
        mean, std = o.float("mean", 0.0), o.float("std", 0.2)
        filters, atoms = o.int("filters", 128), o.int("atoms", 1)
        _check_positive(o, filters=filters, atoms=atoms)
        return cls(**cls.base(o, ctx, Shape(filters, 1, 1), inputs=()), filters=filters,
                   atoms=atoms, mean=mean, std=std)

    def weight_segments(self):
        return [("weights", self.filters * self.atoms)]


@register("normalization", "lrn")
@dataclass(frozen=True)
class NormalizationSpec(LayerSpec):
    """[normalization]/[lrn]: local response normalisation across channels."""
    size: int = 5
    alpha: float = 0.0001
    beta: float = 0.75
    kappa: float = 1.0
    type: ClassVar[str] = "normalization"

    @classmethod
    def parse(cls, o, ctx):
        s = _need_image(o, ctx, "normalization")
        return cls(**cls.base(o, ctx, s), alpha=o.float("alpha", 0.0001),
                   beta=o.float("beta", 0.75), kappa=o.float("kappa", 1.0), size=o.int("size", 5))


# ------------------------------------------------------------------------- output-ish layers
@register("softmax", "soft")
@dataclass(frozen=True)
class SoftmaxSpec(LayerSpec):
    groups: int = 1
    temperature: float = 1.0
    spatial: int = 0
    tree: Optional[Tuple[str, Optional[str]]] = None
    type: ClassVar[str] = "softmax"
    flat: ClassVar[bool] = True

    @classmethod
    def parse(cls, o, ctx):
        groups = o.int("groups", 1)
        _check_positive(o, groups=groups)
        if ctx.inputs % groups:
            raise o.error(f"groups={groups} does not divide the {ctx.inputs} inputs", "groups")
        o.int("noloss", 0)
        return cls(**cls.base(o, ctx, ctx.input), groups=groups,
                   temperature=o.float("temperature", 1.0), spatial=int(o.float("spatial", 0)),
                   tree=_tree(o))


@register("cost")
@dataclass(frozen=True)
class CostSpec(LayerSpec):
    """[cost]: training loss on the previous output; forward passes it through."""
    cost_type: str = "sse"
    scale: float = 1.0
    type: ClassVar[str] = "cost"
    flat: ClassVar[bool] = True

    @classmethod
    def parse(cls, o, ctx):
        t = o.choice("type", "sse", ("sse", "masked", "smooth", "L1", "seg", "wgan"))
        scale = o.float("scale", 1.0)
        o.float("ratio", 0.0)
        o.float("noobject_scale", 1.0)
        o.float("thresh", 0.0)
        return cls(**cls.base(o, ctx, ctx.input), cost_type=t, scale=scale)


@register("contrastive")
@dataclass(frozen=True)
class ContrastiveSpec(LayerSpec):
    """[contrastive]: training-only embedding loss; identity in forward."""
    classes: int = 1000
    temperature: float = 1.0
    yolo_layer: Optional[int] = None
    type: ClassVar[str] = "contrastive"
    flat: ClassVar[bool] = True

    @classmethod
    def parse(cls, o, ctx):
        classes = o.int("classes", 1000)
        yolo = None
        if o.has("yolo_layer"):
            yolo = ctx.layer_ref(o.int("yolo_layer"), "yolo_layer")
            if not isinstance(ctx.layers[yolo], YoloSpec):
                raise o.error(f"yolo_layer={yolo} is not a [yolo] layer", "yolo_layer")
            classes = ctx.layers[yolo].classes  # darknet takes the classes of that [yolo]
        o.float("cls_normalizer", 1.0)
        o.float("max_delta", FLT_MAX)
        o.int("contrastive_neg_max", 3)
        return cls(**cls.base(o, ctx, ctx.input), classes=classes,
                   temperature=o.float("temperature", 1.0), yolo_layer=yolo)


YOLO_TRAIN_OPTIONS = (
    ("max", "int", 200), ("show_details", "int", 1), ("max_delta", "float", FLT_MAX),
    ("label_smooth_eps", "float", 0.0), ("objectness_smooth", "int", 0),
    ("iou_normalizer", "float", 0.75), ("obj_normalizer", "float", 1.0),
    ("cls_normalizer", "float", 1.0), ("delta_normalizer", "float", 1.0),
    ("iou_loss", "str", "mse"), ("iou_thresh_kind", "str", "iou"), ("jitter", "float", 0.2),
    ("resize", "float", 1.0), ("focal_loss", "int", 0), ("ignore_thresh", "float", 0.5),
    ("truth_thresh", "float", 1.0), ("iou_thresh", "float", 1.0), ("random", "float", 0.0),
    ("track_history_size", "int", 5), ("sim_thresh", "float", 0.8), ("dets_for_track", "int", 1),
    ("dets_for_show", "int", 1), ("track_ciou_norm", "float", 0.01),
    ("counters_per_class", "ints", None), ("map", "str", None), ("embedding_layer", "int", None),
)
GAUSSIAN_TRAIN_OPTIONS = tuple(x for x in YOLO_TRAIN_OPTIONS if x[0] not in (
    "show_details", "track_history_size", "sim_thresh", "dets_for_track", "dets_for_show",
    "track_ciou_norm", "embedding_layer")) + (("uc_normalizer", "float", 1.0),
                                              ("yolo_point", "str", "center"))
NMS_KINDS = ("default", "greedynms", "diounms", "cornersnms")


def _read_options(o: Options, table) -> Dict[str, object]:
    out = {}
    for key, kind, default in table:
        getter = getattr(o, kind)
        out[key] = getter(key, default) if default is not None else \
            (getter(key) if o.has(key) else None)
    return out


@dataclass(frozen=True)
class _YoloBase(LayerSpec):
    classes: int = 20
    num: int = 1
    mask: Tuple[int, ...] = ()
    anchors: Tuple[float, ...] = ()  # (w, h) pairs for each mask entry, network pixels
    all_anchors: Tuple[float, ...] = ()  # the first 2*num values darknet keeps
    scale_x_y: float = 1.0
    new_coords: int = 0
    nms_kind: str = "default"
    beta_nms: float = 0.6
    train: Dict[str, object] = field(default_factory=dict, compare=False)
    per_anchor: ClassVar[int] = 5

    @classmethod
    def parse(cls, o, ctx):
        s = _need_image(o, ctx, o.name)
        classes, num = o.int("classes", 20), o.int("num", 1)
        mask = o.ints("mask")
        if mask is None:
            mask = list(range(num))
        listed = o.floats("anchors") or []
        # darknet keeps only the first 2*num anchor values; missing ones stay 0.5
        kept = [listed[i] if i < len(listed) else 0.5 for i in range(2 * num)]
        anchors = []
        for m in mask:
            if m < 0:
                raise o.error(f"mask entry {m} is negative", "mask")
            if m >= num:
                if 2 * m + 1 >= len(listed):
                    raise o.error(f"mask entry {m} has no anchor (num={num}, "
                                  f"{len(listed) // 2} anchors listed)", "mask")
                # darknet reads past its num-pair anchor array here (undefined behaviour)
                o.warn(f"mask entry {m} >= num={num}: Darknet reads this anchor past the end of "
                       f"its list; using anchor {m} as listed", "mask")
                anchors += listed[2 * m:2 * m + 2]
            else:
                anchors += kept[2 * m:2 * m + 2]
        need = len(mask) * (classes + cls.per_anchor)
        if s.c != need:
            raise o.error(f"input has {s.c} channels but {len(mask)} anchors x (classes={classes} "
                          f"+ {cls.per_anchor}) = {need} are needed: set filters={need} in the "
                          f"[convolutional] layer before it", "classes")
        nms_kind = o.str("nms_kind", "default")
        if nms_kind not in NMS_KINDS:
            o.warn(f"unknown nms_kind {nms_kind!r}; Darknet uses default NMS", "nms_kind")
            nms_kind = "default"
        scale_x_y = o.float("scale_x_y", 1.0)
        new_coords = o.int("new_coords", 0) if cls.type == "yolo" else 0
        beta = o.float("beta_nms", 0.6)
        train = _read_options(o, YOLO_TRAIN_OPTIONS if cls.type == "yolo"
                              else GAUSSIAN_TRAIN_OPTIONS)
        return cls(**cls.base(o, ctx, s), classes=classes, num=num, mask=tuple(mask),
                   anchors=tuple(anchors), all_anchors=tuple(kept), scale_x_y=scale_x_y,
                   new_coords=new_coords, nms_kind=nms_kind, beta_nms=beta, train=train)

    @property
    def n(self) -> int:
        return len(self.mask)


@register("yolo")
@dataclass(frozen=True)
class YoloSpec(_YoloBase):
    type: ClassVar[str] = "yolo"
    per_anchor: ClassVar[int] = 5

    def describe(self):
        return "yolo"


@register("Gaussian_yolo")
@dataclass(frozen=True)
class GaussianYoloSpec(_YoloBase):
    type: ClassVar[str] = "Gaussian_yolo"
    per_anchor: ClassVar[int] = 9

    def describe(self):
        return "Gaussian_yolo"


REGION_OPTIONS = (
    ("max", "int", 200), ("log", "int", 0), ("sqrt", "int", 0), ("focal_loss", "int", 0),
    ("jitter", "float", 0.2), ("resize", "float", 1.0), ("rescore", "int", 0),
    ("thresh", "float", 0.5), ("classfix", "int", 0), ("absolute", "int", 0),
    ("random", "float", 0.0), ("coord_scale", "float", 1.0), ("object_scale", "float", 1.0),
    ("noobject_scale", "float", 1.0), ("mask_scale", "float", 1.0), ("class_scale", "float", 1.0),
    ("bias_match", "int", 0), ("map", "str", None),
)


@register("region")
@dataclass(frozen=True)
class RegionSpec(LayerSpec):
    """[region] (YOLOv2): anchors in grid units; logistic objectness, softmax classes."""
    classes: int = 20
    coords: int = 4
    num: int = 1
    anchors: Tuple[float, ...] = ()
    softmax: int = 0
    tree: Optional[Tuple[str, Optional[str]]] = None
    train: Dict[str, object] = field(default_factory=dict, compare=False)
    type: ClassVar[str] = "region"

    @classmethod
    def parse(cls, o, ctx):
        s = _need_image(o, ctx, "region")
        coords, classes, num = o.int("coords", 4), o.int("classes", 20), o.int("num", 1)
        need = num * (classes + coords + 1)
        if s.c != need:
            raise o.error(f"input has {s.c} channels but num={num} x (classes={classes} + "
                          f"coords={coords} + 1) = {need} are needed", "classes")
        listed = o.floats("anchors") or []
        anchors = tuple(listed[i] if i < len(listed) else 0.5 for i in range(2 * num))
        softmax = o.int("softmax", 0)
        tree = _tree(o)
        train = _read_options(o, REGION_OPTIONS)
        return cls(**cls.base(o, ctx, s), classes=classes, coords=coords, num=num,
                   anchors=anchors, softmax=softmax, tree=tree, train=train)

    def describe(self):
        return "detection"


@register("detection")
@dataclass(frozen=True)
class DetectionSpec(LayerSpec):
    """[detection] (YOLOv1): side x side cells, flat output."""
    classes: int = 1
    coords: int = 1
    num: int = 1
    side: int = 7
    softmax: int = 0
    sqrt: int = 0
    rescore: int = 0
    type: ClassVar[str] = "detection"
    flat: ClassVar[bool] = True

    @classmethod
    def parse(cls, o, ctx):
        coords, classes = o.int("coords", 1), o.int("classes", 1)
        rescore, num, side = o.int("rescore", 0), o.int("num", 1), o.int("side", 7)
        need = side * side * ((1 + coords) * num + classes)
        if need != ctx.inputs:
            raise o.error(f"input has {ctx.inputs} values but side={side}^2 x ((1 + coords={coords})"
                          f" x num={num} + classes={classes}) = {need} are needed", "side")
        softmax, sqrt = o.int("softmax", 0), o.int("sqrt", 0)
        for k, kind, d in (("max", "int", 200), ("coord_scale", "float", 1.0),
                           ("forced", "int", 0), ("object_scale", "float", 1.0),
                           ("noobject_scale", "float", 1.0), ("class_scale", "float", 1.0),
                           ("jitter", "float", 0.2), ("resize", "float", 1.0),
                           ("random", "float", 0.0), ("reorg", "int", 0)):
            getattr(o, kind)(k, d)
        return cls(**cls.base(o, ctx, ctx.input), classes=classes, coords=coords, num=num,
                   side=side, softmax=softmax, sqrt=sqrt, rescore=rescore)


DETECTION_TYPES = ("yolo", "Gaussian_yolo", "region", "detection")
UNSUPPORTED_SECTIONS = {"rnn", "gru", "lstm", "conv_lstm", "history"}
